# Session 3, device run 3: evict_step with the victim carried from the previous step (no score arrays).
timeout 150 python3 benchmarks/evict_kernel_time.py > $OUT/evict_kernel_time.log 2>&1; echo kt rc $?
export WORKERS=5 CHECK=1 EVICT_TUNED=$OUT/evict_kernel_time.json
P='[{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","attn":"pallas","iters":3}]'
TAG=s3_run3 timeout 420 python3 benchmarks/gpu_explore.py "$P" > $OUT/s3_run3.log 2>&1; echo rc $?
rm -f $OUT/hlo_*.txt.gz
cat $OUT/evict_kernel_time.log; tail -n 30 $OUT/s3_run3.log
