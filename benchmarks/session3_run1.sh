# Session 3, device run 1: re-profile dense/evict after the cleanup commit; XL GEMMs under XLA flags.
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv
export WORKERS=4
P1='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","attn":"pallas","profile":true,"iters":3},{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"attn":"pallas","profile":true,"iters":2},{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"attn":"pallas","iters":2},{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","attn":"pallas","iters":2}]'
TAG=s3_base timeout 290 python3 benchmarks/gpu_explore.py "$P1" > $OUT/s3_base.log 2>&1; echo base rc $?
GEMM_ROWS=2,128,512 timeout 80 python3 benchmarks/gemm_time.py default > $OUT/gemm_default.log 2>&1
XLA_FLAGS=--xla_gpu_exhaustive_tiling_search=true GEMM_ROWS=2,128,512 timeout 120 python3 benchmarks/gemm_time.py exhaustive > $OUT/gemm_exh.log 2>&1
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false GEMM_ROWS=2,128,512 timeout 80 python3 benchmarks/gemm_time.py cublas > $OUT/gemm_cublas.log 2>&1
tail -n 40 $OUT/*.log
