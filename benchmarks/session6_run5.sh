# Session 6 (H200), device run 5: the committed defaults (cuBLAS program from 128 rows with CUDA
# graphs of any length): GPU check and the headline configurations; then, one process each,
# batch 8 (16 rows) on the cuBLAS program and batch 1 with graphs of any length on the default one.
export PYTHONUNBUFFERED=1
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":256,"batch":8,"policy":"dense","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"iters":3},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":2,"profile":true},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2}]'
CHECK=1 WORKERS=3 TAG=s6_run5 timeout 400 python3 benchmarks/gpu_explore.py "$P" > $OUT/main.log 2>&1; echo main rc $?
grep -E "check|GPT-XL|rror" $OUT/main.log | tail -n 16
B8='[{"model":"GPT-XL","size":256,"batch":8,"policy":"dense","iters":3}]'
GEMM_CUBLAS_MIN_ROWS=16 WORKERS=1 TAG=s6_run5_b8_cublas timeout 60 python3 benchmarks/gpu_explore.py "$B8" > $OUT/b8.log 2>&1; echo b8 rc $?
grep -E "GPT-XL|rror" $OUT/b8.log | tail -n 1
B1='[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3}]'
XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 WORKERS=1 TAG=s6_run5_b1_minsize1 timeout 60 python3 benchmarks/gpu_explore.py "$B1" > $OUT/b1.log 2>&1; echo b1 rc $?
grep -E "GPT-XL|rror" $OUT/b1.log | tail -n 1
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s6_run5_logs.tgz *.log && rm -f *.log
