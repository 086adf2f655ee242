# Session 4, device run 2: decode attention implementations alone (cuDNN included), then GPT-XL 256
# dense at batch 64 / 256 with XLA's exhaustive GEMM tiling search against the default, same run.
echo "== attention impls"; timeout 130 python3 benchmarks/attention_impl_time.py > $OUT/attn.log 2>&1; echo rc $?
grep -v '"error"' $OUT/attn.log | cut -c1-220 | tail -n 25; grep -c error $OUT/attn.log
export WORKERS=2
P1='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3}]'
P2='[{"model":"GPT-XL","size":256,"batch":64,"policy":"dense","iters":3,"profile":true},
{"model":"GPT-XL","size":256,"batch":256,"policy":"dense","iters":2}]'
echo "== default"; TAG=s4_b64_default timeout 100 python3 benchmarks/gpu_explore.py "$P1" > $OUT/def.log 2>&1; echo rc $?
grep -E "GPT-XL" $OUT/def.log | tail -n 1
echo "== exhaustive"; XLA_FLAGS="--xla_gpu_exhaustive_tiling_search=true --xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc" \
  TAG=s4_b64_exh timeout 340 python3 benchmarks/gpu_explore.py "$P2" > $OUT/exh.log 2>&1; echo rc $?
grep -E "profile|GPT-XL|rror" $OUT/exh.log | tail -n 20
rm -f $OUT/hlo_*.gz
cd $OUT && tar czf s4_run2_logs.tgz *.log && rm -f *.log
