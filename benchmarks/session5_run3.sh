# Session 5 (H200), device run 3: the headline configurations of issue 5 on the H200 with the code
# as committed (adsa-evict with cached |v|; one kernel automatically at >= 256 slots), then adsa-evict
# at 256 px forced to one kernel (is the 256-slot threshold right on this GPU?).
export PYTHONUNBUFFERED=1 WORKERS=3
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"iters":3},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2}]'
TAG=s5_h200 timeout 420 python3 benchmarks/gpu_explore.py "$P" > $OUT/main.log 2>&1; echo main rc $?
grep -E "device|GPT-XL|rror" $OUT/main.log | tail -n 12
grep -A10 "^profile" $OUT/main.log | cut -c1-120
P2='[{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3}]'
EVICT_ONE_KERNEL=1 WORKERS=1 TAG=s5_h200_evict256_one timeout 110 python3 benchmarks/gpu_explore.py "$P2" > $OUT/one.log 2>&1; echo one rc $?
grep -E "GPT-XL|rror" $OUT/one.log | tail -n 2
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s5_run3_logs.tgz *.log && rm -f *.log
