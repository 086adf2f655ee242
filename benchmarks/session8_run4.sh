# Session 8, run 4: the small-row GEMV in the model. Profiles of GPT-XL 256 px dense batch 1 with XLA's
# GEMMs, the kernel at gemv_tiling's rule, and a per-shape table from run 3's sweep (w13 and the head
# kept on XLA, where the kernel was not faster); batch 8 and XL-384 batch 1 end to end.
export PYTHONUNBUFFERED=1
one() {  # tag, timeout, plan item, extra env
  echo "== $1"; env $4 WORKERS=1 TAG=$1 timeout $2 python3 benchmarks/gpu_explore.py "[$3]" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-|rror|device busy" $OUT/$1.log | tail -n 2
}
g() { echo "{\"model\":\"GPT-XL\",\"size\":$1,\"batch\":$2,\"policy\":\"dense\",\"iters\":$3$4}"; }
HYB='GEMV_TILES={"1280,3840":[64,64,4],"1280,1280":[64,64,10],"1280,7168":null,"3584,1280":[32,64,14],"1280,16384":null}'
one s8p_b1_xla 70 "$(g 256 1 5 ',"gemm":"xla","profile":true')"
one s8p_b1_gemv 70 "$(g 256 1 5 ',"gemm":"auto","profile":true')"
one s8p_b1_hyb 70 "$(g 256 1 5 ',"gemm":"auto","profile":true')" "$HYB"
one s8p_b8_xla 60 "$(g 256 8 5 ',"gemm":"xla"')"
one s8p_b8_gemv 60 "$(g 256 8 5 ',"gemm":"auto"')"
one s8p_b8_hyb 60 "$(g 256 8 5 ',"gemm":"auto"')" "$HYB"
one s8p_384_b1_xla 70 "$(g 384 1 3 ',"gemm":"xla"')"
one s8p_384_b1_hyb 70 "$(g 384 1 3 ',"gemm":"auto"')" "$HYB"
cd $OUT && tar czf s8_run4_logs.tgz *.log hlo_* && rm -f *.log hlo_* && python3 - <<'PY'
import glob, json, os
parts = [f for f in sorted(glob.glob("s8p*.json"))]
json.dump({f: json.load(open(f)) for f in parts}, open("s8_all_run4.json", "w"), indent=1)
for f in parts:
    os.remove(f)
PY
ls $OUT
