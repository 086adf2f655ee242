# Session 6 (H200), device run 3: generate_program picks cuBLAS GEMMs with XLA's dot merger off
# from 128 rows (batch 64 with CFG). GPU check (incl. cuBLAS vs Triton greedy tokens), the
# headline configurations, a dense XL-256 batch 64 profile with the HLO of its busiest kernels.
export PYTHONUNBUFFERED=1
P='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3},
{"model":"GPT-XL","size":256,"batch":64,"policy":"window","budget":0.5,"iters":3},
{"model":"GPT-XL","size":384,"batch":64,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"dense","iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"window","budget":0.5,"iters":2},
{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2}]'
CHECK=1 WORKERS=3 TAG=s6_run3 timeout 480 python3 benchmarks/gpu_explore.py "$P" > $OUT/main.log 2>&1; echo main rc $?
grep -E "check|GPT-XL|rror" $OUT/main.log | tail -n 16
for h in $OUT/hlo_*.txt.gz; do t=${h#$OUT/hlo_}; python3 benchmarks/hlo_fusions.py $h $OUT/prof_${t%.txt.gz}.json 16 > $OUT/fusions_${t%.txt.gz}.txt; done
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s6_run3_logs.tgz *.log && rm -f *.log
