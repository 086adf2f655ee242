# Session 6 (H200), device run 1: q/k/v in one array read in place by the step kernel, top-k
# without a sort (top-p off): GPU check, headline configurations with a dense profile and the
# HLO of its busiest kernels, the filter alone, and the session-5 code (.old = git archive
# 0cab575) on the same GPU for dense XL-256 batch 64 / 256.
export PYTHONUNBUFFERED=1
timeout 60 python3 benchmarks/topk_time.py > $OUT/topk.log 2>&1; echo topk rc $?; tail -n 3 $OUT/topk.log | cut -c1-400
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2}]'
CHECK=1 WORKERS=3 TAG=s6_run1 timeout 380 python3 benchmarks/gpu_explore.py "$P" > $OUT/main.log 2>&1; echo main rc $?
grep -E "check|GPT-XL|rror" $OUT/main.log | tail -n 13
for h in $OUT/hlo_*.txt.gz; do t=${h#$OUT/hlo_}; python3 benchmarks/hlo_fusions.py $h $OUT/prof_${t%.txt.gz}.json 22 > $OUT/fusions_${t%.txt.gz}.txt; done
rm -f $OUT/hlo_*.gz
O='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2}]'
(cd .old && OUT=$OUT WORKERS=2 TAG=s6_run1_old timeout 130 python3 benchmarks/gpu_explore.py "$O" > $OUT/old.log 2>&1; echo old rc $?)
grep -E "GPT-XL|rror" $OUT/old.log | tail -n 3
cd $OUT && tar czf s6_run1_logs.tgz *.log && rm -f *.log
