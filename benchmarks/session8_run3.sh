# Session 8, run 3: the split-K Pallas GEMV (kernels.small_matmul) for decode at few rows.
#  A. benchmarks/gemv_time.py at 2 rows: XLA's GEMM against the kernel over tile settings, per shape.
#  B. end to end, one process per configuration: GPT-XL 256 px dense batch 1 and 8 with --gemm xla
#     against --gemm auto (the kernel), two other tile settings at batch 1; XL-384 and GPT-B batch 1.
export PYTHONUNBUFFERED=1
echo "== gemv_time"; GEMV_ROWS=2 timeout 240 python3 benchmarks/gemv_time.py > $OUT/gemv_time.log 2>&1; echo rc $?
grep -E "xla|best" $OUT/gemv_time.log
bench() {  # tag, timeout, python prelude, bench CLI arguments
  echo "== $1"; timeout $2 python3 -c "$3
from adsa_jax.cli import main
raise SystemExit(main('$4 --json $OUT/$1.json'.split()))" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-|rror" $OUT/$1.log | tail -n 2
}
D="import adsa_jax"
XL="bench --model GPT-XL --image-size 256 --policies dense --iters 5 --segments 1"
bench s8g_b1_xla 60 "$D" "$XL --batch 1 --gemm xla"
bench s8g_b1_gemv 60 "$D" "$XL --batch 1 --gemm auto"
bench s8g_b1_gemv_t2 60 "import adsa_jax.kernels as k; k.GEMV_BLOCK_N, k.GEMV_BLOCK_K, k.GEMV_PROGRAMS = 128, 256, 256" "$XL --batch 1"
bench s8g_b1_gemv_t3 60 "import adsa_jax.kernels as k; k.GEMV_BLOCK_N, k.GEMV_PROGRAMS = 32, 1024" "$XL --batch 1"
bench s8g_b8_xla 60 "$D" "$XL --batch 8 --gemm xla"
bench s8g_b8_gemv 60 "$D" "$XL --batch 8 --gemm auto"
bench s8g_384_b1_gemv 80 "$D" "bench --model GPT-XL --image-size 384 --policies dense --iters 3 --segments 1 --batch 1"
bench s8g_B_b1_gemv 60 "$D" "bench --model GPT-B --image-size 256 --policies dense --iters 5 --segments 1 --batch 1"
cd $OUT && tar czf s8_run3_logs.tgz *.log && rm -f *.log && python3 - <<'PY'
import glob, json
parts = [f for f in sorted(glob.glob("s8g*.json"))]
json.dump({f: json.load(open(f)) for f in parts}, open("s8_all_run3.json", "w"), indent=1)
for f in parts:
    import os; os.remove(f)
PY
