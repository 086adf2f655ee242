# Prepared in session 6 (no device left to run it): the next measurements, one configuration per
# process (a compile running beside timed calls distorts them: BENCHMARKS.md, session 6).
#  A. the defaults at GPT-XL 256 px, batch 1 / 64 / 256 (reference for B and C in the same run);
#  B. generate.STACK_FFN=1 (w1 and w3 stacked once per call: one FFN GEMM without the dot merger);
#  C. the one-kernel dense step at batch 1 and 8 (FUSABLE=1, attention forced to the kernel);
#  D. kernels.ROPE_IN_KERNEL=1 (the step kernel rotates q and k: no XLA RoPE fusion per layer),
#     dense batch 64 / 256 and adsa-evict XL-384 batch 64 (against its session-6 2.369 s).
#  E. kernels.EVICT_TC_SCORE=1 (the victim search's v . total on the tensor cores): the kernel
#     alone (evict_kernel_time.py also times D and E there) and XL-384 batch 64 / 256 adsa-evict,
#     for the selection share (against window 1.976 / 5.657 s in session 6).
# Adopt B (STACK_FFN = True), C (evict_fusable for small batches), D (ROPE_IN_KERNEL = True) or E
# (EVICT_TC_SCORE = True) only where they are faster; then re-run A's rows with everything adopted.
# Two device calls (each under the 600 s limit): `bash benchmarks/session7_plan.sh 1` (A-C), then `... 2` (D-E).
# Outcome (BENCHMARKS.md, session 7): B and D adopted (now the defaults); E slower, removed; C (with D)
# faster at batch 1 and 8 (part 3, 4): now the default where kernels.one_kernel_fits; FUSABLE= is no longer read.
# Part 3 (`... 3`): the headline rows with B and D adopted, one configuration per process.
export PYTHONUNBUFFERED=1
export PART=${1:-1}
one() {  # tag, timeout, plan item, extra env
  echo "== $1 $4"; env $4 WORKERS=1 TAG=$1 timeout $2 python3 benchmarks/gpu_explore.py "[$3]" > $OUT/$1.log 2>&1; echo rc $?
  grep -E "GPT-XL|rror" $OUT/$1.log | tail -n 1
}
xl() { echo "{\"model\":\"GPT-XL\",\"size\":256,\"batch\":$1,\"policy\":\"dense\",\"iters\":$2$3}"; }
if [ "$PART" = 1 ]; then
one s7_b1 60 "$(xl 1 5)"
one s7_b64 70 "$(xl 64 5)"
one s7_b256 80 "$(xl 256 3)"
one s7_b1_stack 60 "$(xl 1 5)" STACK_FFN=1
one s7_b64_stack 70 "$(xl 64 5)" STACK_FFN=1
one s7_b256_stack 80 "$(xl 256 3)" STACK_FFN=1
one s7_b1_fused 60 "$(xl 1 5 ',"attn":"pallas"')" FUSABLE=1
one s7_b8_fused 60 "$(xl 8 5 ',"attn":"pallas"')" FUSABLE=1
elif [ "$PART" = 3 ]; then
ev() { echo "{\"model\":\"GPT-XL\",\"size\":384,\"batch\":$1,\"policy\":\"$2\",\"iters\":$3$4}"; }
one s7f_b1 60 "$(xl 1 5)"
one s7f_b1_fused 60 "$(xl 1 5 ',"attn":"pallas"')" FUSABLE=1
one s7f_b8 60 "$(xl 8 5)"
one s7f_b8_fused 60 "$(xl 8 5 ',"attn":"pallas"')" FUSABLE=1
one s7f_b64 70 "$(xl 64 5)"
one s7f_b256 80 "$(xl 256 3)"
one s7f_d384_b64 80 "$(ev 64 dense 3)"
one s7f_d384_b256 100 "$(ev 256 dense 2)"
one s7f_e384_b64 80 "$(ev 64 adsa-evict 3 ',"budget":0.5')"
one s7f_e384_b256 100 "$(ev 256 adsa-evict 2 ',"budget":0.5')"
one s7f_w384_b64 80 "$(ev 64 window 3 ',"budget":0.5')"
one s7f_w384_b256 100 "$(ev 256 window 2 ',"budget":0.5')"
elif [ "$PART" = 4 ]; then  # the one-kernel step below evict_fusable's batch (C at 384 px, GPT-B, adsa-evict)
g() { echo "{\"model\":\"$1\",\"size\":$2,\"batch\":$3,\"policy\":\"$4\",\"iters\":$5$6}"; }
one s7s_d384_b1 60 "$(g GPT-XL 384 1 dense 3)"
one s7s_d384_b1_fused 60 "$(g GPT-XL 384 1 dense 3 ',"attn":"pallas"')" FUSABLE=1
one s7s_d384_b8 60 "$(g GPT-XL 384 8 dense 3)"
one s7s_d384_b8_fused 60 "$(g GPT-XL 384 8 dense 3 ',"attn":"pallas"')" FUSABLE=1
one s7s_e384_b8 60 "$(g GPT-XL 384 8 adsa-evict 3 ',"budget":0.5')"
one s7s_e384_b8_fused 60 "$(g GPT-XL 384 8 adsa-evict 3 ',"budget":0.5,"attn":"pallas"')" FUSABLE=1
one s7s_B256_b1 50 "$(g GPT-B 256 1 dense 5)"
one s7s_B256_b1_fused 50 "$(g GPT-B 256 1 dense 5 ',"attn":"pallas"')" FUSABLE=1
one s7s_B256_b8 50 "$(g GPT-B 256 8 dense 5)"
one s7s_B256_b8_fused 50 "$(g GPT-B 256 8 dense 5 ',"attn":"pallas"')" FUSABLE=1
elif [ "$PART" = 5 ]; then  # final defaults (B, C, D adopted; bench.measure_device looped in one program)
g() { echo "{\"model\":\"$1\",\"size\":$2,\"batch\":$3,\"policy\":\"$4\",\"iters\":$5$6}"; }
one s7g_b1 60 "$(g GPT-XL 256 1 dense 5)"
one s7g_b8 60 "$(g GPT-XL 256 8 dense 5)"
one s7g_b64 70 "$(g GPT-XL 256 64 dense 5)"
one s7g_b256 80 "$(g GPT-XL 256 256 dense 3)"
one s7g_b64_prof 80 "$(g GPT-XL 256 64 dense 2 ',"profile":true')"
one s7g_d384_b1 60 "$(g GPT-XL 384 1 dense 3)"
one s7g_e384_b8 60 "$(g GPT-XL 384 8 adsa-evict 3 ',"budget":0.5')"
elif [ "$PART" = 6 ]; then  # GPT-B / GPT-L rows and budget 0.25 at XL-384 (the bench CLI: one process, compiled one at a time)
timeout 330 python3 -m adsa_jax.cli bench --model GPT-B,GPT-L --image-size 256 --batch 1,8,64,256 \
  --policies dense,adsa-evict,window --budgets 0.5 --iters 3 --segments 1 --json $OUT/s7_BL.json > $OUT/s7_BL.log 2>&1
echo rc $?; grep -E "GPT-|device" $OUT/s7_BL.log | tail -n 30
timeout 150 python3 -m adsa_jax.cli bench --model GPT-XL --image-size 384 --batch 64 \
  --policies adsa-evict,window --budgets 0.25 --iters 2 --segments 1 --json $OUT/s7_XL025.json > $OUT/s7_XL025.log 2>&1
echo rc $?; grep -E "GPT-|device" $OUT/s7_XL025.log | tail -n 4
elif [ "$PART" = 7 ]; then  # profiles of the misses: batch 1, and the selection at XL-384 batch 64
g() { echo "{\"model\":\"$1\",\"size\":$2,\"batch\":$3,\"policy\":\"$4\",\"iters\":$5$6}"; }
one s7p_b1 60 "$(g GPT-XL 256 1 dense 2 ',"profile":true')"
one s7p_e384_b64 80 "$(g GPT-XL 384 64 adsa-evict 2 ',"budget":0.5,"profile":true')"
rm -f $OUT/hlo_*.txt.gz
else
one s7_b64_rope 70 "$(xl 64 5)" ROPE_IN_KERNEL=1
one s7_b256_rope 80 "$(xl 256 3)" ROPE_IN_KERNEL=1
one s7_evict384_rope 80 '{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3}' ROPE_IN_KERNEL=1
one s7_evict384_tc 80 '{"model":"GPT-XL","size":384,"batch":64,"policy":"adsa-evict","budget":0.5,"iters":3}' EVICT_TC_SCORE=1
one s7_evict384_b256_tc 100 '{"model":"GPT-XL","size":384,"batch":256,"policy":"adsa-evict","budget":0.5,"iters":2}' EVICT_TC_SCORE=1
timeout 90 python3 benchmarks/evict_kernel_time.py > $OUT/s7_evict_kernel.log 2>&1; echo kernel rc $?
grep -E "qkv|best" $OUT/s7_evict_kernel.log | cut -c1-200
fi
cd $OUT && tar czf s7_part${PART}_logs.tgz *.log && rm -f *.log && python3 - <<'PY'
import glob, json, os  # one summary file (the device returns at most 8 files)
parts = [f for f in sorted(glob.glob("s7*.json")) if not f.startswith("s7_all")]
json.dump({f: json.load(open(f)) for f in parts}, open("s7_all_part" + os.environ.get("PART", "") + ".json", "w"), indent=1)
for f in parts:
    os.remove(f)
PY
