# Session 6 (H200), device run 4: the cuBLAS program leaves the GPU idle ~18% of a dense XL-256
# batch 64 call (run 3 profile: busy 632 ms over a 775 ms span). CUDA-graph (command buffer)
# settings, one process per flag set: the whole scan loop as one graph (WHILE, CONDITIONAL),
# and graphs of any size.
export PYTHONUNBUFFERED=1
run() {  # tag, XLA_FLAGS, timeout, plan, extra env
  echo "== $1: $2 $5"; env $5 XLA_FLAGS="$2" WORKERS=2 TAG=$1 timeout $3 python3 benchmarks/gpu_explore.py "$4" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-XL|rror|^profile" $OUT/$1.log | tail -n 3
}
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"
B64='{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true}'
B1='{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3}'
run s6_run4_while "$CB" 130 "[$B64,$B1]"
run s6_run4_minsize1 "--xla_gpu_graph_min_graph_size=1" 100 "[$B64]"
run s6_run4_while_triton "$CB" 100 "[$B64]" GEMM_CUBLAS_MIN_ROWS=none
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s6_run4_logs.tgz *.log && rm -f *.log
