# Session 8, run 5: the small-row GEMV without its padded copy of x (masked loads; run 4's profile
# showed one XLA pad kernel per GEMM eating the kernel's gain). GPT-XL 256 px dense batch 1 and 8,
# XL-384 batch 1, GPT-B batch 1: --gemm xla against the kernel (rule tiles; run 4's table at batch 1).
export PYTHONUNBUFFERED=1
one() {  # tag, timeout, plan item, extra env
  echo "== $1"; env $4 WORKERS=1 TAG=$1 timeout $2 python3 benchmarks/gpu_explore.py "[$3]" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-|rror|device busy" $OUT/$1.log | tail -n 2
}
g() { echo "{\"model\":\"$1\",\"size\":$2,\"batch\":$3,\"policy\":\"dense\",\"iters\":$4$5}"; }
HYB='GEMV_TILES={"1280,3840":[64,64,4],"1280,1280":[64,64,10],"1280,7168":null,"3584,1280":[32,64,14],"1280,16384":null}'
one s8q_b1_gemv 70 "$(g GPT-XL 256 1 5 ',"gemm":"auto","profile":true')"
one s8q_b1_xla 60 "$(g GPT-XL 256 1 5 ',"gemm":"xla"')"
one s8q_b1_hyb 60 "$(g GPT-XL 256 1 5 ',"gemm":"auto"')" "$HYB"
one s8q_b8_gemv 60 "$(g GPT-XL 256 8 5 ',"gemm":"auto"')"
one s8q_384_b1_gemv 60 "$(g GPT-XL 384 1 3 ',"gemm":"auto"')"
one s8q_B_b1_xla 45 "$(g GPT-B 256 1 5 ',"gemm":"xla"')"
one s8q_B_b1_gemv 45 "$(g GPT-B 256 1 5 ',"gemm":"auto"')"
cd $OUT && tar czf s8_run5_logs.tgz *.log hlo_* && rm -f *.log hlo_* && python3 - <<'PY'
import glob, json, os
parts = [f for f in sorted(glob.glob("s8q*.json"))]
json.dump({f: json.load(open(f)) for f in parts}, open("s8_all_run5.json", "w"), indent=1)
for f in parts:
    os.remove(f)
PY
