# Prepared in session 9 (its device time spent). Until session 9, `adsa-jax bench` sweeps (and
# gpu_explore.py runs with WORKERS > 1 and several items) compiled the next configuration while
# timing the current one, which slowed launch-bound batch 1-8 rows by up to ~2.5x; bench.compiled_in_order
# no longer does. This re-measures those small-batch rows with the fixed sweep, and profiles batch 1
# at the session-9 default (GEMV K blocks of 64) to see what is left above 0.3 s.
# Usage: `bash benchmarks/session10_plan.sh N` for N = 1..7; each under the 600 s limit.
# Ran in session 10 in the order 1, 4, 5, 6, 7 (parts 4-7 written during the session); parts 2-3 were not
# run (part 6 measured GPT-XL at budget 0.5; the budget-0.25 XL rows moved to session11_plan.sh).
source "$(dirname "$0")/plan_helpers.sh"  # bench, one, g
export PART=${1:-1}
P="--policies dense,adsa-evict,window --budgets 0.5,0.25 --batch 1,8"
if [ "$PART" = 1 ]; then
echo "== s10_b1_prof"; WORKERS=1 TAG=s10_b1_prof timeout 70 python3 benchmarks/gpu_explore.py \
  '[{"model":"GPT-XL","size":256,"batch":1,"policy":"dense","iters":3,"profile":true}]' > $OUT/s10_b1_prof.log 2>&1; echo rc $?
bench s10_B_small 260 "--model GPT-B --image-size 256,384 $P"
bench s10_L_small 260 "--model GPT-L --image-size 256,384 $P"
elif [ "$PART" = 2 ] || [ "$PART" = 3 ]; then
bench s10_XL${PART}_small 560 "--model GPT-XL --image-size $([ "$PART" = 2 ] && echo 256 || echo 384) $P"
fi
# Parts 4 and 5 (written in session 10): kernels.add_rms_norm, the residual add of the wo / w2 GEMV
# partials and the next RMSNorm in one kernel (GEMV_ADD_NORM=1, the default as written) against
# the XLA kernels it replaces (GEMV_ADD_NORM=0), one configuration per process, alternating.
if [ "$PART" = 4 ]; then
B1="$(g 256 1 dense 5)"
one s10_b1_an0 60 "$B1" GEMV_ADD_NORM=0
one s10_b1_an1 60 "$B1" GEMV_ADD_NORM=1
one s10_b1_an0r 60 "$B1" GEMV_ADD_NORM=0
one s10_b1_an1r 60 "$B1" GEMV_ADD_NORM=1
one s10_b8_an0 60 "$(g 256 8 dense 5)" GEMV_ADD_NORM=0
one s10_b8_an1 60 "$(g 256 8 dense 5)" GEMV_ADD_NORM=1
one s10_b1_384_an1 70 "$(g 384 1 dense 3)" GEMV_ADD_NORM=1
echo "== add_norm_check"; timeout 90 python3 benchmarks/add_norm_check.py > $OUT/add_norm_check.log 2>&1; echo rc $?; tail -n 2 $OUT/add_norm_check.log
one s10_b1_an1_prof 70 "$(g 256 1 dense 3 ',"profile":true')" GEMV_ADD_NORM=1
elif [ "$PART" = 5 ]; then  # after part 4: add_norm 3.18 / 2.81 us (wo / w2) against ~3.06 us of XLA kernels
B1="$(g 256 1 dense 5)"  # (0.313 vs 0.309 s): all partials in one load over more warps; fewer partials
one s10_b1_an0c 60 "$B1" GEMV_ADD_NORM=0
one s10_b1_c32w16 60 "$B1" GEMV_ADD_NORM=1,ADD_NORM_CHUNK=32,ADD_NORM_NUM_WARPS=16
one s10_b1_c32w32 60 "$B1" GEMV_ADD_NORM=1,ADD_NORM_CHUNK=32,ADD_NORM_NUM_WARPS=32
one s10_b1_c16w16 60 "$B1" GEMV_ADD_NORM=1,ADD_NORM_CHUNK=16,ADD_NORM_NUM_WARPS=16
one s10_b1_p256 60 "$B1" GEMV_ADD_NORM=1,GEMV_PROGRAMS=256
one s10_b1_p256c16w16 60 "$B1" GEMV_ADD_NORM=1,GEMV_PROGRAMS=256,ADD_NORM_CHUNK=16,ADD_NORM_NUM_WARPS=16
one s10_b1_an0p256 60 "$B1" GEMV_ADD_NORM=0,GEMV_PROGRAMS=256
fi
if [ "$PART" = 6 ]; then  # after part 5: chunks of 16 over 16 warps the default (0.301 vs 0.310 s)
B1="$(g 256 1 dense 5)"
one s10_b1_d1 60 "$B1"
one s10_b1_d0 60 "$B1" GEMV_ADD_NORM=0
one s10_b1_d1r 60 "$B1"
one s10_b8_d1 60 "$(g 256 8 dense 5)"
one s10_b1_384_d1 70 "$(g 384 1 dense 3)"
Q="--policies dense,adsa-evict,window --budgets 0.5 --batch 1,8"
bench s10_XL256_small 170 "--model GPT-XL --image-size 256 $Q"
bench s10_XL384_small 200 "--model GPT-XL --image-size 384 $Q"
fi
if [ "$PART" = 7 ]; then  # after part 6 (batch 1 0.301-0.302 s): warps and chunk around 16 / 16
B1="$(g 256 1 dense 5)"
one s10_b1_c16w8 60 "$B1" ADD_NORM_NUM_WARPS=8
one s10_b1_c8w16 60 "$B1" ADD_NORM_CHUNK=8
one s10_b1_e1 60 "$B1"
one s10_b1_c16w32 60 "$B1" ADD_NORM_NUM_WARPS=32
one s10_b1_c4w16 60 "$B1" ADD_NORM_CHUNK=4
fi
cd $OUT && tar czf s10_part${PART}_logs.tgz *.log 2>/dev/null; rm -f *.log
