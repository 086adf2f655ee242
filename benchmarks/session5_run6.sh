# Session 5 (H200), device run 6: the committed defaults (dense, window and adsa-evict steps as one
# kernel where rows x heads fill the GPU; the victim search scoring o where the block holds it):
# GPU check, kernel alone, and the headline configurations.
export PYTHONUNBUFFERED=1
timeout 60 python3 benchmarks/evict_kernel_time.py > $OUT/evict.log 2>&1; echo evict rc $?
grep -E "best|window', 'block_k': 64, 'warps': 2" $OUT/evict.log | cut -c1-200
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"iters":3},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2}]'
CHECK=1 WORKERS=3 TAG=s5_final timeout 400 python3 benchmarks/gpu_explore.py "$P" > $OUT/main.log 2>&1; echo main rc $?
grep -E "check|GPT-XL|rror" $OUT/main.log | tail -n 13
grep -A8 "^profile" $OUT/main.log | cut -c1-120
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s5_run6_logs.tgz *.log && rm -f *.log
