# Ran at commits 31f17a9 and 19d55a3 (FUSED_LINEAR switch in adsa_jax.kernels); fused_linear has since moved to
# benchmarks/fused_linear.py and the switch is gone, so the FUSED_LINEAR lines no longer apply.
# Session 5 (H200), device run 1: fused projections (kernels.fused_linear) alone and at batch 1 / 8,
# the evict kernel with cached |v| alone.
export PYTHONUNBUFFERED=1
timeout 250 python3 benchmarks/linear_time.py > $OUT/linear.log 2>&1; echo linear rc $?
grep -E "M=|best for" $OUT/linear.log | cut -c1-300
timeout 80 python3 benchmarks/evict_kernel_time.py > $OUT/evict.log 2>&1; echo evict rc $?
grep -E "best|score" $OUT/evict.log | cut -c1-200
P='[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":5,"profile":true},
{"model":"GPT-XL","size":256,"batch":8,"policy":"dense","iters":3}]'
export WORKERS=2
FUSED_LINEAR=0 TAG=s5_b1_base timeout 110 python3 benchmarks/gpu_explore.py "$P" > $OUT/base.log 2>&1; echo base rc $?
grep -E "device|profile|GPT-XL|rror" $OUT/base.log | tail -n 6
FUSED_LINEAR=pallas LINEAR_TUNED=$OUT/linear_time.json TAG=s5_b1_fused timeout 120 python3 benchmarks/gpu_explore.py "$P" > $OUT/fused.log 2>&1; echo fused rc $?
grep -E "LINEAR|profile|GPT-XL|rror" $OUT/fused.log | tail -n 6
grep -A12 "^profile" $OUT/fused.log | head -14
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s5_run1_logs.tgz *.log && rm -f *.log
