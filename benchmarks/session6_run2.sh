# Session 6 (H200), device run 2: the weight GEMMs under cuBLAS / cuBLASLt instead of XLA's
# Triton GEMMs (one process per flag set), and a default-flags profile of dense XL-256 batch 64
# with the HLO of its busiest kernels (which ops each fusion runs, the GEMMs' tiling and split-K).
export PYTHONUNBUFFERED=1
run() {  # tag, XLA_FLAGS, timeout, plan
  echo "== $1: $2"; XLA_FLAGS="$2" WORKERS=3 TAG=$1 timeout $3 python3 benchmarks/gpu_explore.py "$4" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-XL|rror" $OUT/$1.log | tail -n 4
}
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3}]'
run s6_run2_cublas "--xla_gpu_enable_triton_gemm=false" 170 "$P"
run s6_run2_cublaslt "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true" 170 "$P"
run s6_run2_default "" 120 '[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true}]'
for h in $OUT/hlo_*.txt.gz; do t=${h#$OUT/hlo_}; python3 benchmarks/hlo_fusions.py $h $OUT/prof_${t%.txt.gz}.json 24 > $OUT/fusions_${t%.txt.gz}.txt; done
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s6_run2_logs.tgz *.log && rm -f *.log
