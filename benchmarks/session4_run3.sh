# Session 4, device run 3: evict_step with a per-lane running first maximum (one reduction after the
# loop instead of two cross-warp reductions per block): the kernel alone, then end to end with
# kernels.EVICT_ONE_KERNEL on, window and the committed unfused evict path beside it.
timeout 120 python3 benchmarks/evict_kernel_time.py > $OUT/ekt.log 2>&1; echo kt rc $?
grep -E "evict_step'|decode_attention|best" $OUT/ekt.log | cut -c1-160
export WORKERS=4
P='[{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":3}]'
EVICT_ONE_KERNEL=1 CHECK=1 TAG=s4_run3_one timeout 330 python3 benchmarks/gpu_explore.py "$P" > $OUT/one.log 2>&1; echo rc $?
grep -E "check|profile|GPT-XL|rror" $OUT/one.log | tail -n 16
P2='[{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":3}]'
EVICT_ONE_KERNEL=0 TAG=s4_run3_unfused timeout 100 python3 benchmarks/gpu_explore.py "$P2" > $OUT/unf.log 2>&1; echo rc $?
grep -E "GPT-XL" $OUT/unf.log | tail -n 1
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s4_run3_logs.tgz *.log && rm -f *.log
