# Prepared in session 11 (its device time spent). Part 1: kth_largest back at one count per pass
# (session 10's 1-bit form; session 11 measured the 2-count regression, 25 us per step): the kernel
# alone and GPT-XL 256 px batch 1 end to end (two processes); evict_step's middle tiling (128 slots
# over 4 warps, measured at 320 row-heads only) at batch 16 and 32 (640 and 1280 row-heads) against
# the large-grid 64 / 2, to place EVICT_MID_ROW_HEADS; the step kernel alone with 2 and 3 pipeline
# stages (evict_kernel_time.py). Each one JSON: 8 files, the most a run returns.
# Part 2: GPT-XL 256 px batch 256 adsa-evict / window 0.5 (no H200 row yet) and GPT-XL batch 1 sparse
# policies under the new tiling.
# Part 3: the GEMV kernel as a GEMM at 32-128 rows (gemm='pallas') against cuBLAS at GPT-XL batch 16-64
# (compare part 1's batch 16/32 rows and s12_b64_auto; XL-384 adsa-evict batch 64 auto: 2.216 s, session 7).
# Parts 4-7 were written during session 12 (part 8 was a command line, in its results file).
# Usage: `bash benchmarks/session12_plan.sh N` for N = 1-7 (each under the 600 s limit). Parts 3 and 4
# measured code since removed: the GEMM (GEMM_BLOCK_N, GEMM_PROGRAMS, gemm='pallas' above 16 rows; at
# commit 565f340) and kernels.EVICT_DOTS with benchmarks/evict_dots_time.py (commit a49be2e); check
# those commits out to run them again. Parts 5-7 set the large-grid tiling through EVICT_BLOCK_K /
# EVICT_NUM_WARPS, then 64 / 2 (now 32 / 1, the default from 1024 row-heads).
source "$(dirname "$0")/plan_helpers.sh"  # bench, one, g
export PART=${1:-1}
if [ "$PART" = 1 ]; then
echo "== topk_time"; timeout 150 python3 benchmarks/topk_time.py > $OUT/topk_time.log 2>&1; echo rc $?
grep -o "'rows': [0-9]*\|kth_warps16[a-z0-9_]*_us': [0-9.]*" $OUT/topk_time.log | tr '\n' ' '; echo
one s12_b1_a 60 "$(g 256 1 dense 5)" ""
one s12_b1_b 60 "$(g 256 1 dense 5)" ""
one s12_b16_64w2 70 "$(g 256 16 dense 3)" ""
one s12_b16_128w4 70 "$(g 256 16 dense 3)" EVICT_BLOCK_K=128,EVICT_NUM_WARPS=4
one s12_b32_64w2 70 "$(g 256 32 dense 3)" ""
one s12_b32_128w4 70 "$(g 256 32 dense 3)" EVICT_BLOCK_K=128,EVICT_NUM_WARPS=4
echo "== evict_kernel_time"; timeout 120 python3 benchmarks/evict_kernel_time.py > $OUT/ekt.log 2>&1; echo rc $?
grep "stages" $OUT/ekt.log
elif [ "$PART" = 2 ]; then  # the two cells of issue 5's grid with no H200 row (GPT-XL 256 px batch 256 at
# budget 0.5), and GPT-XL batch 1 for the sparse policies under session 11's small-grid tiling
bench s12_XL256_b256 200 "--model GPT-XL --image-size 256 --policies adsa-evict,window --budgets 0.5 --batch 256"
bench s12_XL_b1 360 "--model GPT-XL --image-size 256,384 --policies adsa-evict,window --budgets 0.5,0.25 --batch 1"
elif [ "$PART" = 3 ]; then  # written in session 11: the GEMV kernel as a GEMM above 16 rows (gemm='pallas'
# only; 'auto' keeps cuBLAS there) against cuBLAS, which tiles qkv as 60 CTAs at 128 rows
P='"gemm":"pallas"'
one s12_b64_auto 70 "$(g 256 64 dense 5)" ""
one s12_b64_gemm 70 "$(g 256 64 dense 5 ",$P")" ""
one s12_b64_gemm_bn64 70 "$(g 256 64 dense 5 ",$P")" GEMM_BLOCK_N=64
one s12_b64_gemm_p264 70 "$(g 256 64 dense 5 ",$P")" GEMM_PROGRAMS=264
one s12_b32_gemm 70 "$(g 256 32 dense 3 ",$P")" ""
one s12_b16_gemm 70 "$(g 256 16 dense 3 ",$P")" ""
one s12_b64_128w4 70 "$(g 256 64 dense 5)" EVICT_BLOCK_K=128,EVICT_NUM_WARPS=4
one s12_e384_b64_gemm 90 "$(g 384 64 adsa-evict 3 ",\"budget\":0.5,$P")" ""
elif [ "$PART" = 4 ]; then  # written in session 12: evict_step's reductions as tensor-core dots
# (kernels.EVICT_DOTS), the kernel alone, then end to end
echo "== evict_dots_time"; timeout 200 python3 benchmarks/evict_dots_time.py > $OUT/edt.log 2>&1; echo rc $?
grep "'us'\|error" $OUT/edt.log
one s12_e384_b64 80 "$(g 384 64 adsa-evict 3 ',"budget":0.5')" ""
one s12_e384_b64_s 80 "$(g 384 64 adsa-evict 3 ',"budget":0.5')" EVICT_DOTS=s
one s12_e384_b64_slp 80 "$(g 384 64 adsa-evict 3 ',"budget":0.5')" EVICT_DOTS=slp
one s12_b64_lp 60 "$(g 256 64 dense 5)" EVICT_DOTS=lp
one s12_b1_lp 60 "$(g 256 1 dense 5)" EVICT_DOTS=lp
elif [ "$PART" = 5 ]; then  # after the GEMM's removal and kth_largest's 32 warps: batch 1 end to end;
# the step kernel at blocks of 16-64 slots over 1-2 warps (alone, then end to end at XL-384 batch 64)
one s12_b1_final 60 "$(g 256 1 dense 5)" ""
echo "== evict_kernel_time tiles"; TILES=16x1,32x1,32x2,64x1 timeout 120 python3 benchmarks/evict_kernel_time.py > $OUT/ekt.log 2>&1; echo rc $?
grep "'us'" $OUT/ekt.log
one s12_e384_b64_64w1 80 "$(g 384 64 adsa-evict 3 ',"budget":0.5')" EVICT_NUM_WARPS=1
one s12_e384_b64_32w1 80 "$(g 384 64 adsa-evict 3 ',"budget":0.5')" EVICT_BLOCK_K=32,EVICT_NUM_WARPS=1
elif [ "$PART" = 6 ]; then  # 32 slots over 1 warp at large grids (part 5: adsa-evict 2.067 s against 2.219):
# dense and window too, and batch 256
T=EVICT_BLOCK_K=32,EVICT_NUM_WARPS=1
one s12_b64_32w1 60 "$(g 256 64 dense 5)" $T
one s12_d384_b64_32w1 70 "$(g 384 64 dense 3)" $T
one s12_d384_b64 70 "$(g 384 64 dense 3)" ""
one s12_w384_b64_32w1 70 "$(g 384 64 window 3 ',"budget":0.5')" $T
one s12_e384_b256_32w1 100 "$(g 384 256 adsa-evict 3 ',"budget":0.5')" $T
one s12_d384_b256_32w1 100 "$(g 384 256 dense 3)" $T
elif [ "$PART" = 7 ]; then  # 32 / 1 at GPT-XL 256 px batch 256 and 32 (the smallest grid it would take)
T=EVICT_BLOCK_K=32,EVICT_NUM_WARPS=1
one s12_b256_32w1 70 "$(g 256 256 dense 3)" $T
one s12_b32_32w1 50 "$(g 256 32 dense 3)" $T
fi
cd $OUT && rm -f *.log
