# Prepared in session 10 (its device time spent). Part 1: what session 10 left unmeasured: a float32
# GPU check of kernels.add_rms_norm (tokens with and without it, and against XLA's GEMMs), the batch-1
# profile at the new default (16 partials per load over 16 warps), and the budget-0.25 GPT-XL rows
# and GPT-L 384 px window 0.25 batch 8 that still carry session 9's compile overlap.
# Usage: `bash benchmarks/session11_plan.sh 1`; under the 600 s limit.
export PYTHONUNBUFFERED=1
export PART=${1:-1}
bench() { echo "== $1"; timeout $2 python3 -m adsa_jax.cli bench $3 --iters 3 --segments 1 --json $OUT/$1.json > $OUT/$1.log 2>&1
  echo rc $?; grep -E "GPT-|rror" $OUT/$1.log | tail -n 1; }
if [ "$PART" = 1 ]; then
echo "== add_norm_check f32"; DTYPE=float32 timeout 120 python3 benchmarks/add_norm_check.py > $OUT/add_norm_check_f32.log 2>&1; echo rc $?
tail -n 1 $OUT/add_norm_check_f32.log
echo "== s11_b1_prof"; WORKERS=1 TAG=s11_b1_prof timeout 70 python3 benchmarks/gpu_explore.py \
  '[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3,"profile":true}]' > $OUT/s11_b1_prof.log 2>&1; echo rc $?
Q="--policies adsa-evict,window --budgets 0.25 --batch 1,8"
bench s11_XL_small 300 "--model GPT-XL --image-size 256,384 $Q"
bench s11_L384_w8 60 "--model GPT-L --image-size 384 --policies window --budgets 0.25 --batch 8"
fi
cd $OUT && tar czf s11_part${PART}_logs.tgz *.log 2>/dev/null; rm -f *.log
