# Session 3, device run 2: the one-kernel adsa-evict/window step and the dense in-kernel cache write.
export WORKERS=5 CHECK=1
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","attn":"pallas","iters":2},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","attn":"pallas","iters":2}]'
TAG=s3_run2 timeout 560 python3 benchmarks/gpu_explore.py "$P" > $OUT/s3_run2.log 2>&1; echo rc $?
rm -f $OUT/hlo_*.txt.gz
tail -n 45 $OUT/s3_run2.log
