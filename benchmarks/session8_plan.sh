# Prepared in session 7 (its device time spent): the next measurements, one configuration per process.
#  A. kernels.one_kernel_fits checked where it was extrapolated: GPT-XL t2i 512 px (120 + 1024 slots)
#     at batch 1 and 4, the rule's path against the one kernel forced (ONE_KERNEL_MAX_SLOTS raised);
#     and XL-384 batch 1 dense on the rule's path (XLA attention: 0.857 s in session 7, part 4).
#  B. batch 1 under XLA's exhaustive GEMM tiling search (4% on the H100 in session 4; the GEMMs are
#     25.5 of 38.7 us per layer and step at batch 1 now).
#  C. rows the issue asks for and session 7 left out: GPT-B and GPT-L at 384 px, GPT-XL 384 px
#     batch 256 at budget 0.25.
# Usage: `bash benchmarks/session8_plan.sh 1` (A, B), then `... 2` (C); each under the 600 s limit.
export PYTHONUNBUFFERED=1
export PART=${1:-1}
bench() {  # tag, timeout, python prelude, bench CLI arguments
  echo "== $1"; timeout $2 python3 -c "$3
from adsa_jax.cli import main
raise SystemExit(main('$4 --json $OUT/$1.json'.split()))" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-|rror" $OUT/$1.log | tail -n 1
}
RULE="import adsa_jax"
FORCED="import adsa_jax.kernels as k; k.ONE_KERNEL_MAX_SLOTS = 10**9"
T2I="bench --model GPT-XL --type t2i --image-size 512 --policies dense --iters 3 --segments 1"
if [ "$PART" = 1 ]; then
bench s8_t2i512_b1 120 "$RULE" "$T2I --batch 1"
bench s8_t2i512_b1_forced 120 "$FORCED" "$T2I --batch 1"
bench s8_t2i512_b4 120 "$RULE" "$T2I --batch 4"
bench s8_t2i512_b4_forced 120 "$FORCED" "$T2I --batch 4"
bench s8_d384_b1 60 "$RULE" "bench --model GPT-XL --image-size 384 --batch 1 --policies dense --iters 3 --segments 1"
echo "== s8_b1_exhaustive"; XLA_FLAGS=--xla_gpu_exhaustive_tiling_search=true timeout 150 python3 -m adsa_jax.cli \
  bench --model GPT-XL --image-size 256 --batch 1 --policies dense --iters 5 --json $OUT/s8_b1_exhaustive.json \
  > $OUT/s8_b1_exhaustive.log 2>&1; echo rc $?; grep -E "GPT-|rror" $OUT/s8_b1_exhaustive.log | tail -n 1
else
bench s8_BL384 330 "$RULE" "bench --model GPT-B,GPT-L --image-size 384 --batch 1,8,64,256 --policies dense,adsa-evict,window --budgets 0.5 --iters 2 --segments 1"
bench s8_XL384_b256_025 150 "$RULE" "bench --model GPT-XL --image-size 384 --batch 256 --policies adsa-evict,window --budgets 0.25 --iters 2 --segments 1"
fi
cd $OUT && tar czf s8_part${PART}_logs.tgz *.log && rm -f *.log && python3 - <<'PY'
import glob, json, os  # one summary file (the device returns at most 8 files)
parts = [f for f in sorted(glob.glob("s8*.json")) if not f.startswith("s8_all")]
json.dump({f: json.load(open(f)) for f in parts}, open("s8_all_part" + os.environ.get("PART", "") + ".json", "w"), indent=1)
for f in parts:
    os.remove(f)
PY
