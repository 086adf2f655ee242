# Prepared in session 9 (its device time spent). Until session 9, `adsa-jax bench` sweeps (and
# gpu_explore.py runs with WORKERS > 1 and several items) compiled the next configuration while
# timing the current one, which slowed launch-bound batch 1-8 rows by up to ~2.5x; bench.compiled_in_order
# no longer does. This re-measures those small-batch rows with the fixed sweep, and profiles batch 1
# at the session-9 default (GEMV K blocks of 64) to see what is left above 0.3 s.
# Usage: `bash benchmarks/session10_plan.sh N` for N = 1..3 in turn; each under the 600 s limit.
export PYTHONUNBUFFERED=1
export PART=${1:-1}
bench() { echo "== $1"; timeout $2 python3 -m adsa_jax.cli bench $3 --iters 3 --segments 1 --json $OUT/$1.json > $OUT/$1.log 2>&1
  echo rc $?; grep -E "GPT-|rror" $OUT/$1.log | tail -n 1; }
P="--policies dense,adsa-evict,window --budgets 0.5,0.25 --batch 1,8"
if [ "$PART" = 1 ]; then
echo "== s10_b1_prof"; WORKERS=1 TAG=s10_b1_prof timeout 70 python3 benchmarks/gpu_explore.py \
  '[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3,"profile":true}]' > $OUT/s10_b1_prof.log 2>&1; echo rc $?
bench s10_B_small 260 "--model GPT-B --image-size 256,384 $P"
bench s10_L_small 260 "--model GPT-L --image-size 256,384 $P"
else
bench s10_XL${PART}_small 560 "--model GPT-XL --image-size $([ "$PART" = 2 ] && echo 256 || echo 384) $P"
fi
cd $OUT && tar czf s10_part${PART}_logs.tgz *.log 2>/dev/null; rm -f *.log
