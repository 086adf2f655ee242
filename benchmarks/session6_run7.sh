# Session 6 (H200), device run 7: the cuBLAS program without the CUDA-graph minimum of run 5/6
# (were run 3's idle gaps the compiles running beside the timed calls?), one process.
export PYTHONUNBUFFERED=1
B64='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":5,"profile":true}]'
WORKERS=1 TAG=s6_run7_b64 timeout 80 python3 benchmarks/gpu_explore.py "$B64" > $OUT/b64.log 2>&1; echo rc $?
grep -E "GPT-XL|rror|^profile" $OUT/b64.log | tail -n 2
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s6_run7_logs.tgz *.log && rm -f *.log
