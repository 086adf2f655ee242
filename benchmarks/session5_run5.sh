# Session 5 (H200), device run 5: dense as one kernel (DENSE_ONE_KERNEL=1) with the unpatched-block
# evict_step, against run 3's default dense numbers (same code for the default path).
export PYTHONUNBUFFERED=1
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","iters":2}]'
DENSE_ONE_KERNEL=1 WORKERS=4 TAG=s5_run5_dense_one timeout 250 python3 benchmarks/gpu_explore.py "$P" > $OUT/one.log 2>&1; echo one rc $?
grep -E "GPT-XL|rror" $OUT/one.log | tail -n 4
cd $OUT && tar czf s5_run5_logs.tgz *.log && rm -f *.log
