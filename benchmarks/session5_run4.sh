# Session 5 (H200), device run 4: evict_step without the per-element patching of this step's writes
# (new token and moved token start the online softmax; cached |v|): GPU check, kernel alone, end to end;
# and the pre-|v|-cache code (.old = commit a4aedc7^, carried) at 256 px batch 64 as one kernel.
export PYTHONUNBUFFERED=1
timeout 80 python3 benchmarks/evict_kernel_time.py > $OUT/evict.log 2>&1; echo evict rc $?
grep -E "best|window', 'block_k': 64, 'warps': 2" $OUT/evict.log | cut -c1-200
P='[{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"iters":3}]'
EVICT_ONE_KERNEL=1 CHECK=1 WORKERS=3 TAG=s5_run4 timeout 330 python3 benchmarks/gpu_explore.py "$P" > $OUT/main.log 2>&1; echo main rc $?
grep -E "check|GPT-XL|rror" $OUT/main.log | tail -n 10
grep -A6 "^profile" $OUT/main.log | cut -c1-120
P2='[{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3}]'
(cd .old && EVICT_ONE_KERNEL=1 WORKERS=1 TAG=s5_run4_old256 OUT=$OUT timeout 100 python3 ../benchmarks/gpu_explore.py "$P2" > $OUT/old.log 2>&1; echo old rc $?)
grep -E "GPT-XL|rror" $OUT/old.log | tail -n 2
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s5_run4_logs.tgz *.log && rm -f *.log
