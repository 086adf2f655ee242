# Prepared in session 10 (its device time spent). Part 1: top-k's k-th largest with 2 or 4 bits per
# counting pass (kernels.KTH_BITS; 16 or 8 block-wide reductions instead of 32 at batch 1, where the
# kernel took 14.4 us per step, 3.7 ms per GPT-XL call): the kernel alone over warps and bits, then
# GPT-XL 256 px batch 1 end to end per setting (one configuration per process, alternating); a
# float32 GPU check of kernels.add_rms_norm; the batch-1 profile at the current default.
# Part 2: add_rms_norm on and off at GPT-B / GPT-L batch 1 (measured on GPT-XL only), the budget-0.25 GPT-XL rows and GPT-L 384 px window 0.25 batch 8 that still carry
# session 9's compile overlap.
# Parts 3 and 4 (written in session 11): evict_step's block and warps at batch 1 and 8. The device
# returns at most 8 files per run: one JSON per `one` call, no more than 8 calls per part.
# Usage: `bash benchmarks/session11_plan.sh N` for N = 1, 2, 3, 4, 5, 7; each under the 600 s limit. Afterwards
# set KTH_BITS (and kth_largest's default warps) to whatever won, in adsa_jax/kernels.py.
# KTH_BITS (part 1) was removed after session 12 (1 bit won): run part 1 at commit 6a65392.
source "$(dirname "$0")/plan_helpers.sh"  # bench, one, g
export PART=${1:-1}
if [ "$PART" = 1 ]; then
echo "== topk_time"; timeout 150 python3 benchmarks/topk_time.py > $OUT/topk_time.log 2>&1; echo rc $?
grep -o "'rows': [0-9]*\|kth_warps16[a-z0-9_]*_us': [0-9.]*" $OUT/topk_time.log | tr '\n' ' '; echo
B1="$(g 256 1 dense 5)"
one s11_b1_bits1 60 "$B1" KTH_BITS=1
one s11_b1_bits2 60 "$B1" KTH_BITS=2
one s11_b1_bits4 60 "$B1" KTH_BITS=4
one s11_b1_bits1r 60 "$B1" KTH_BITS=1
echo "== add_norm_check f32"; DTYPE=float32 timeout 120 python3 benchmarks/add_norm_check.py > $OUT/add_norm_check_f32.log 2>&1; echo rc $?
tail -n 1 $OUT/add_norm_check_f32.log
one s11_b1_prof 70 "$(g 256 1 dense 3 ',"profile":true')"
elif [ "$PART" = 2 ]; then  # add_rms_norm was measured on GPT-XL only: GPT-B and GPT-L batch 1, on and off
for m in GPT-B GPT-L; do
  for an in 1 0; do one s11_${m}_b1_an$an 60 "{\"model\":\"$m\",\"size\":256,\"batch\":1,\"policy\":\"dense\",\"iters\":5}" GEMV_ADD_NORM=$an; done
done
bench s11_XL_small 360 "--model GPT-XL --image-size 256,384 --policies adsa-evict,window --budgets 0.25 --batch 1,8"
bench s11_L384_w8 80 "--model GPT-L --image-size 384 --policies window --budgets 0.25 --batch 8"
elif [ "$PART" = 3 ]; then  # written in session 11: evict_step's block and warps at small grids (tuned at
# XL-384 batch 64 shapes, 2560 row-heads; batch 1 has 40 row-heads, the kernel 7.0 us per layer step)
B1="$(g 256 1 dense 5)"
for bw in 64,2 128,2 128,4 256,4 64,4 256,8 128,8 64,2; do
  one s11_b1_ek${bw/,/_w} 60 "$B1" EVICT_BLOCK_K=${bw%,*},EVICT_NUM_WARPS=${bw#*,}
done
E1="$(g 256 1 adsa-evict 5 ',"budget":0.5')"
for bw in 64,2 128,4; do one s11_b1e_ek${bw/,/_w} 60 "$E1" EVICT_BLOCK_K=${bw%,*},EVICT_NUM_WARPS=${bw#*,}; done
elif [ "$PART" = 4 ]; then  # after part 3: EVICT_SMALL_BLOCK_K / EVICT_SMALL_NUM_WARPS (256 / 8) below
# ONE_KERNEL_MIN_ROW_HEADS; wider still, GPT-XL 384 px batch 1 on one kernel, batch 8 on the small settings
one s11_b1_def 60 "$(g 256 1 dense 5)" ""
one s11_b1_k512 60 "$(g 256 1 dense 5)" EVICT_SMALL_BLOCK_K=512
one s11_b1_w16 60 "$(g 256 1 dense 5)" EVICT_SMALL_NUM_WARPS=16
one s11_b1_384_def 90 "$(g 384 1 dense 3)" ""
one s11_b1_384_one 90 "$(g 384 1 dense 3)" ONE_KERNEL_MAX_SLOTS=600
one s11_b8_def 60 "$(g 256 8 dense 5)" ""
one s11_b8_small 60 "$(g 256 8 dense 5)" ONE_KERNEL_MIN_ROW_HEADS=512
one s11_b1e_def 60 "$(g 256 1 adsa-evict 5 ',"budget":0.5')" ""
elif [ "$PART" = 5 ]; then  # after part 4 (ONE_KERNEL_MAX_SLOTS 600): the new defaults at batch 1; 512 px
# (1025 slots) with and without one kernel
one s11_b1_384 90 "$(g 384 1 dense 3)" ""
one s11_b1_512_two 110 "$(g 512 1 dense 3)" ""
one s11_b1_512_one 110 "$(g 512 1 dense 3)" ONE_KERNEL_MAX_SLOTS=1100
one s11_b1e_384 90 "$(g 384 1 adsa-evict 3 ',"budget":0.5')" ""
one s11_b1w_384 90 "$(g 384 1 window 3 ',"budget":0.25')" ""
for m in GPT-B GPT-L; do one s11_${m}_b1 60 "{\"model\":\"$m\",\"size\":256,\"batch\":1,\"policy\":\"dense\",\"iters\":5}" ""; done
elif [ "$PART" = 7 ]; then  # (part 6 was the t2i 512 px bench run, see BENCHMARKS.md) batch 8 = 320 row-heads,
# on the large-grid setting (64 / 2): 128 / 4 there, and the small setting (256 / 8) at 384 px's longer loop
one s11_b8_128w4 60 "$(g 256 8 dense 5)" EVICT_BLOCK_K=128,EVICT_NUM_WARPS=4
one s11_b8_384_def 80 "$(g 384 8 dense 3)" ""
one s11_b8_384_small 80 "$(g 384 8 dense 3)" ONE_KERNEL_MIN_ROW_HEADS=512
one s11_b8_384_128w4 80 "$(g 384 8 dense 3)" EVICT_BLOCK_K=128,EVICT_NUM_WARPS=4
fi
cd $OUT && tar czf s11_part${PART}_logs.tgz *.log 2>/dev/null; rm -f *.log
