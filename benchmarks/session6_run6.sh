# Session 6 (H200), device run 6: one configuration per process (no compile running beside the
# timed calls): dense XL-256 batch 64 on the committed cuBLAS program, the same with the CUDA-graph
# minimum also set by XLA_FLAGS, and batch 256.
export PYTHONUNBUFFERED=1
run() {  # tag, XLA_FLAGS, timeout, plan
  echo "== $1: $2"; XLA_FLAGS="$2" WORKERS=1 TAG=$1 timeout $3 python3 benchmarks/gpu_explore.py "$4" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-XL|rror|^profile" $OUT/$1.log | tail -n 2
}
B64='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":5,"profile":true}]'
run s6_run6_b64 "" 80 "$B64"
run s6_run6_b64_flag "--xla_gpu_graph_min_graph_size=1" 80 "$B64"
run s6_run6_b256 "" 80 '[{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":3}]'
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s6_run6_logs.tgz *.log && rm -f *.log
