# Session 4, device run 4: dense as one kernel per layer step (evict_step on the dense cache: write +
# attention over the filled slots) against the committed dense path, same run; cuDNN on our layout.
export WORKERS=3
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","attn":"pallas","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","attn":"pallas","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","attn":"pallas","iters":2}]'
DENSE_ONE_KERNEL=1 CHECK=1 TAG=s4_run4_dense_one timeout 230 python3 benchmarks/gpu_explore.py "$P" > $OUT/one.log 2>&1; echo rc $?
grep -E "check|profile|GPT-XL|rror" $OUT/one.log | tail -n 9
DENSE_ONE_KERNEL=0 TAG=s4_run4_dense_base timeout 170 python3 benchmarks/gpu_explore.py "$P" > $OUT/base.log 2>&1; echo rc $?
grep -E "profile|GPT-XL|rror" $OUT/base.log | tail -n 4
timeout 110 python3 benchmarks/attention_impl_time.py > $OUT/attn.log 2>&1; echo attn rc $?
grep cudnn_BHSD $OUT/attn.log | cut -c1-400
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s4_run4_logs.tgz *.log && rm -f *.log
