# Ran at commits 31f17a9 and 19d55a3 (FUSED_LINEAR switch in adsa_jax.kernels); fused_linear has since moved to
# benchmarks/fused_linear.py and the switch is gone, so the FUSED_LINEAR lines no longer apply.
# Session 5 (H200), device run 2: fused_linear with larger K blocks and the unrolled norm prologue
# (batch 1 rows); evict_step alone before (.old = commit a4aedc7^, carried) and after caching |v|.
export PYTHONUNBUFFERED=1
LINEAR_ROWS=2 LINEAR_TUNE_ROWS=2 LINEAR_GRID="16,32,64;256,512,1024;4;3,4,5" timeout 200 python3 benchmarks/linear_time.py > $OUT/linear.log 2>&1; echo linear rc $?
grep -E "M=|best for" $OUT/linear.log | cut -c1-260
mkdir -p $OUT/old; (cd .old && OUT=$OUT/old timeout 60 python3 benchmarks/evict_kernel_time.py > $OUT/evict_old.log 2>&1; echo old rc $?)
grep -E "best|window', 'block_k': 64, 'warps': 2" $OUT/evict_old.log | cut -c1-200
mv $OUT/old/evict_kernel_time.json $OUT/evict_kernel_time_before_vnorm.json; rmdir $OUT/old
P='[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":5,"profile":true},
{"model":"GPT-XL","size":256,"batch":8,"policy":"dense","iters":3}]'
FUSED_LINEAR=pallas LINEAR_TUNED=$OUT/linear_time.json WORKERS=2 TAG=s5_b1_fused timeout 150 python3 benchmarks/gpu_explore.py "$P" > $OUT/fused.log 2>&1; echo fused rc $?
grep -E "LINEAR|profile|GPT-XL|rror" $OUT/fused.log | tail -n 6
grep -A16 "^profile" $OUT/fused.log | head -18
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s5_run2_logs.tgz *.log && rm -f *.log
