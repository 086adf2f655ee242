# Session 4, device run 1: batch 1 (launch-bound) under XLA flags, GPT-XL 256 dense, attention auto (XLA).
# Each flag set is its own process (XLA reads XLA_FLAGS once); profile of the default first.
P='[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":5,"profile":true}]'
P2='[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":5}]'
export WORKERS=1
run() {  # tag, flags, timeout
  echo "== $1: $2"; XLA_FLAGS="$2" TAG=$1 timeout $3 python3 benchmarks/gpu_explore.py "$4" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "profile|GPT-XL|Error|error" $OUT/$1.log | tail -n 6
}
run s4_b1_default "" 110 "$P"
run s4_b1_nocb "--xla_gpu_enable_command_buffer=" 90 "$P2"
run s4_b1_unroll "--xla_gpu_command_buffer_unroll_loops=true" 110 "$P"
run s4_b1_exh "--xla_gpu_exhaustive_tiling_search=true --xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc" 270 "$P"
ls /tmp/atc 2>/dev/null | wc -l
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s4_run1_logs.tgz *.log && rm -f *.log
