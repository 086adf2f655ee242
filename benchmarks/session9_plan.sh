# Prepared in session 8 (its device time spent): the next measurements, one configuration per process.
#  A. batch 1 (GPT-XL 256 px dense, 0.313 s with the GEMV; 0.3 s is the target): kernels.QKV_PARTIALS
#     (the step kernel sums the qkv partials: one XLA kernel per layer step less), kernels.GEMV_NORM
#     (the RMSNorms inside the GEMV: two less), both, and the GEMV's warps, stages, programs and K
#     block, one setting per process; both switches with a profile, and at batch 8 (part 1: the
#     switches, part 2: the tile settings).
#  B. (part 3) the GEMV where session 8 did not measure it: batch 2 and 4, adsa-evict / window at
#     XL-384 batch 8; each against --gemm xla.
#  C. the budget-0.25 rows the issue's tables still lack: GPT-B and GPT-L at 256 and 384 px (part 4),
#     GPT-XL at 256 px and at 384 px batch 1 and 8 (part 5), adsa-evict and window.
# Usage: `bash benchmarks/session9_plan.sh N` for N = 1..5 in turn; each under the 600 s limit.
# Afterwards set whatever won as the default in adsa_jax/kernels.py (QKV_PARTIALS, GEMV_NORM, GEMV_*).
# Ran in session 9 in the order 1, 2, 6, 3, 4, 5, 7 (parts 6 and 7 added on the way). Outcome: GEMV_BLOCK_K=64
# became the default; QKV_PARTIALS (no faster), GEMV_NORM (slower) and GEMV_GLU (slower) were then
# removed from adsa_jax.kernels, so parts 1 and 7 no longer run as written (a record of what ran).
export PYTHONUNBUFFERED=1
export PART=${1:-1}
one() {  # tag, timeout, plan item, KERNELS settings
  echo "== $1 $4"; env KERNELS=$4 WORKERS=1 TAG=$1 timeout $2 python3 benchmarks/gpu_explore.py "[$3]" > $OUT/$1.log 2>&1
  echo rc $?; grep -E "GPT-|rror|device busy" $OUT/$1.log | tail -n 2
}
g() { echo "{\"model\":\"GPT-XL\",\"size\":$1,\"batch\":$2,\"policy\":\"$3\",\"iters\":$4$5}"; }
if [ "$PART" = 1 ]; then
B1="$(g 256 1 dense 5)"
one s9_b1 60 "$B1"
one s9_b1_qkvparts 60 "$B1" QKV_PARTIALS=1
one s9_b1_norm 60 "$B1" GEMV_NORM=1
one s9_b1_both 60 "$B1" QKV_PARTIALS=1,GEMV_NORM=1
one s9_b8_both 60 "$(g 256 8 dense 5)" QKV_PARTIALS=1,GEMV_NORM=1
one s9_b1_both_prof 70 "$(g 256 1 dense 3 ',"profile":true')" QKV_PARTIALS=1,GEMV_NORM=1
elif [ "$PART" = 2 ]; then
B1="$(g 256 1 dense 5)"
one s9_b1_w2 60 "$B1" GEMV_NUM_WARPS=2
one s9_b1_w8 60 "$B1" GEMV_NUM_WARPS=8
one s9_b1_s2 60 "$B1" GEMV_NUM_STAGES=2
one s9_b1_s4 60 "$B1" GEMV_NUM_STAGES=4
one s9_b1_p256 60 "$B1" GEMV_PROGRAMS=256
one s9_b1_p1024 60 "$B1" GEMV_PROGRAMS=1024
one s9_b1_k64 60 "$B1" GEMV_BLOCK_K=64
one s9_b1_k256 60 "$B1" GEMV_BLOCK_K=256
elif [ "$PART" = 6 ]; then  # added after part 2: GEMV_BLOCK_K=64 won (0.307 s); around it
B1="$(g 256 1 dense 5)"
one s9_b1_k64r 60 "$B1" GEMV_BLOCK_K=64
one s9_b1_k32 60 "$B1" GEMV_BLOCK_K=32
one s9_b1_k64s4 60 "$B1" GEMV_BLOCK_K=64,GEMV_NUM_STAGES=4
one s9_b1_k64p1024 60 "$B1" GEMV_BLOCK_K=64,GEMV_PROGRAMS=1024
one s9_b1_k64n32 60 "$B1" GEMV_BLOCK_K=64,GEMV_BLOCK_N=32
one s9_b1_k64n128 60 "$B1" GEMV_BLOCK_K=64,GEMV_BLOCK_N=128
one s9_b8_k64 60 "$(g 256 8 dense 5)" GEMV_BLOCK_K=64
one s9_b1_384_k64 70 "$(g 384 1 dense 3)" GEMV_BLOCK_K=64
elif [ "$PART" = 7 ]; then  # added after part 6 (K block 64 the default): the SwiGLU inside the w2 GEMV
B1="$(g 256 1 dense 5)"
one s9_b1_k64d 60 "$B1"
one s9_b1_glu 60 "$B1" GEMV_GLU=1
one s9_b1_glu_qkv 60 "$B1" GEMV_GLU=1,QKV_PARTIALS=1
one s9_b8_glu 60 "$(g 256 8 dense 5)" GEMV_GLU=1
one s9_b1_384_glu 70 "$(g 384 1 dense 3)" GEMV_GLU=1
one s9_b1_glu_prof 70 "$(g 256 1 dense 3 ',"profile":true')" GEMV_GLU=1
elif [ "$PART" = 3 ]; then
one s9_b2 60 "$(g 256 2 dense 5)"
one s9_b2_xla 60 "$(g 256 2 dense 5 ',"gemm":"xla"')"
one s9_b4 60 "$(g 256 4 dense 5)"
one s9_b4_xla 60 "$(g 256 4 dense 5 ',"gemm":"xla"')"
one s9_e384_b8 70 "$(g 384 8 adsa-evict 3 ',"budget":0.5')"
one s9_e384_b8_xla 70 "$(g 384 8 adsa-evict 3 ',"budget":0.5,"gemm":"xla"')"
one s9_w384_b8 70 "$(g 384 8 window 3 ',"budget":0.5')"
one s9_w384_b8_xla 70 "$(g 384 8 window 3 ',"budget":0.5,"gemm":"xla"')"
else  # C: the bench CLI, one process per model (its configurations in turn)
Q="--policies adsa-evict,window --budgets 0.25 --iters 2 --segments 1"
bench() { echo "== $1"; timeout $2 python3 -m adsa_jax.cli bench $3 $Q --json $OUT/$1.json > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-|rror" $OUT/$1.log | tail -n 1; }
if [ "$PART" = 4 ]; then
bench s9_B_025 200 "--model GPT-B --image-size 256,384 --batch 1,8,64,256"
bench s9_L_025 300 "--model GPT-L --image-size 256,384 --batch 1,8,64,256"
else
bench s9_XL256_025 330 "--model GPT-XL --image-size 256 --batch 1,8,64,256"
bench s9_XL384_025 200 "--model GPT-XL --image-size 384 --batch 1,8"
fi
fi
cd $OUT && tar czf s9_part${PART}_logs.tgz *.log hlo_* 2>/dev/null; rm -f *.log hlo_*; python3 - <<'PY'
import glob, json, os  # one summary file (profiles stay separate)
parts = [f for f in sorted(glob.glob("s9*.json")) if not f.startswith("s9_all")]
json.dump({f: json.load(open(f)) for f in parts}, open("s9_all_part" + os.environ.get("PART", "") + ".json", "w"), indent=1)
for f in parts:
    os.remove(f)
PY
