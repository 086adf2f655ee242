# Session 6 (H200), device run 8: XL-384 batch 64 dense / window / adsa-evict 0.5, one process
# each (no compile beside the timed calls), for the evict-to-dense ratio and the selection share.
export PYTHONUNBUFFERED=1
for p in dense window adsa-evict; do
  b=$([ $p = dense ] && echo null || echo 0.5)
  WORKERS=1 TAG=s6_run8_$p timeout 75 python3 benchmarks/gpu_explore.py "[{\"model\":\"GPT-XL\",\"size\":384,\"batch\":64,\"policy\":\"$p\",\"budget\":$b,\"iters\":3}]" > $OUT/$p.log 2>&1; echo $p rc $?
  grep -E "GPT-XL|rror" $OUT/$p.log | tail -n 1
done
cd $OUT && tar czf s6_run8_logs.tgz *.log && rm -f *.log
