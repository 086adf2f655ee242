# Session 3, device run 4: the defaults as committed (adsa-evict: attention kernel + XLA bookkeeping;
# window: one kernel), re-measured.
export WORKERS=5
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":3},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":2}]'
TAG=s3_run4 timeout 330 python3 benchmarks/gpu_explore.py "$P" > $OUT/s3_run4.log 2>&1; echo rc $?
tail -n 8 $OUT/s3_run4.log
