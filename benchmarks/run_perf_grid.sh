#!/usr/bin/env bash
# adsa_jax beside the PyTorch LlamaGen sampler on one GPU, the same day: GPT-XL dense (random
# weights, bf16, CFG 4, top-k 2000) at 256 px batch 1, 64, 256 and 384 px batch 1, 64, 256 with
# `adsa-jax bench`, then LlamaGen's own `generate` (benchmarks/llamagen_torch.py), eager and
# torch.compile, at 256 px batch 1, 64, 256 and 384 px batch 64, right after on the same machine.
#
# Usage: bash benchmarks/run_perf_grid.sh PART [MODEL:PX [POLICIES]], PARTs one after another on one machine;
# each part ends within 10 minutes on one H200 (a timeout guards every command, and every script
# rewrites its JSON after each row, so a part cut short keeps what it measured):
#   1  adsa-jax bench (~2.5 min), then llamagen_torch.py eager (~4.5 min: a call is 10-25 s)
#   2  llamagen_torch.py torch.compile at 256 px batch 1 and 64 (a fresh compile each, minutes)
#   3  llamagen_torch.py torch.compile at 256 px batch 256 and 384 px batch 64
#   4  adsa-jax bench, every policy against its floor: GPT-XL 384 px batch 64, dense, adsa-evict (head and
#      layer, period 1 and 8) and window at budgets 0.5 and 0.25 (11 configurations, ~5 min; needs no
#      LlamaGen checkout)
#   7  the same at batch 256
#   5  adsa-jax bench --memory-cap 40: the largest batch each policy fits in 40 GiB and its images/s
#      (dense, adsa-evict 0.5 and 0.25, window 0.5 and 0.25) for MODEL:PX, one of GPT-XL:384 (the
#      default), GPT-XL:512, GPT-XXL:384: one call each. The searches start from the peaks in
#      benchmarks/cap_peaks_h200.json (benchmarks/cap_peaks.py compiles them without a GPU), so the GPU
#      compiles about one batch a policy (on an H100: GPT-XL:512 ~6 min, GPT-XXL:384 ~4.5); without that
#      file a search compiles a policy 4 times or more
#   6  the same under the whole device's memory (--memory-cap device, XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; on an
#      H100: GPT-XL:384 ~7 min, GPT-XXL:384 ~7.5; GPT-XL:512 in two calls as below, 6.8 and 4.3 min).
#      On an H200 the batches are about 1.8x the H100's and the five do not end within 10 minutes (GPT-XL:384 on
#      2026-12-06: a 3-minute search, then ~8 minutes of calls, cut off): give POLICIES, a part of
#      dense,adsa-evict,window, and run two parts, e.g. `6 GPT-XL:384 dense,adsa-evict` then `6 GPT-XL:384 window`
#      (H200, 2026-12-06: 5.3 and 4 min; GPT-XL:512 7.6 and 5.5 min). Parts 5 and 6 take POLICIES
#   9  adsa-evict head against layer at period 1, budget 0.5, GPT-XL 384 px batch 256 (~3 min): layer's
#      time relative to head's at the large batch
#  10  benchmarks/generate_profile.py: where a call's GPU time goes for adsa-evict (head and layer, period 1
#      and 8) and window, GPT-XL 384 px batch 64, budget 0.5 (~4 min): the step kernels, the choice, the leaving step
#  11  benchmarks/kernel_switch_time.py: adsa-evict with a KernelConfig switch on and off in one process, 384 px
#      batch 64, 0.5: first_choice_scan per head and per layer (~5 min); 13: layer's layer_choice_in_kernel,
#      period 8's leave_top_in_kernel per head, and head's scoring kernel over 16-slot blocks (score_tile) (~6 min)
#  12  benchmarks/generate_profile.py for dense at 256 px, batch 1, 64 and 256 (~2 min): GEMMs, attention, sampling
#      and launch gaps of each call, into $OUT/dense/generate_profile.json
#   8  benchmarks/xla_flag_time.py command-buffer: dense 256 px batch 1 and 64, window 384 px batch 64 under
#      XLA's command-buffer (CUDA graph) settings, and batch 1 with the loop unrolled, one process each (~4 min)
#  15  benchmarks/kernel_switch_time.py: widen_by_bits (bf16 K and V widened by their bits) on and off, adsa-evict 0.5
#      per head at 384 px batch 64 and 256, dense at 256 px batch 64 (~6 min), its tokens checked equal
#  14  benchmarks/xla_flag_time.py fma: dense 256 px, adsa-evict and window 384 px 0.5, batch 64, with and without
#      LLVM's FMA contraction (-nvptx-fma-level=1), one process each (~5 min)
#  16  benchmarks/kernel_switch_time.py: score_widens_apart (the score widens V on its own) on and off, adsa-evict
#      per head at 384 px: 0.5 at batch 64 and 256, 0.25 at 64 (~6 min), its tokens checked equal
# Parts 1 to 3 need a LlamaGen checkout at third_party/LlamaGen (ignored by git; the docstring of
# benchmarks/llamagen_torch.py says how to get it); a device run carries that path.
#
# Writes under $OUT (default ./out): perf_adsa_jax.json (the JSON of adsa-jax bench --json),
# perf_torch_eager.json, perf_torch_compile_1.json, perf_torch_compile_2.json (results.json rows),
# perf_policies_64.json and perf_policies_256.json (parts 4 and 7), perf_cap_40_MODEL_PX.json (part 5),
# perf_cap_device_MODEL_PX.json (part 6; given POLICIES, both names end in _ and the policies joined by -,
# e.g. perf_cap_device_GPT-XL_384_dense-window.json), perf_granularity_256.json (part 9), xla_flag_time_command-buffer.json and xla_flag_time_fma.json (parts 8, 14),
# generate_profile.json (part 10), dense/generate_profile.json (part 12) and switch_11/, switch_13/, switch_15/,
# switch_16/ kernel_switch_time.json (parts 11, 13, 15, 16) (not results.json rows: read them), and a log per command. Then, in
# the repository:
#   for f in OUTDIR/perf_*.json; do python benchmarks/make_tables.py --add "$f"; done
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
PART=${1:-}
case "$PART" in
  1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16) ;;
  *) echo "usage: bash benchmarks/run_perf_grid.sh PART [MODEL:PX] (PART 1 to 16; see the header)" >&2; exit 2 ;;
esac
CONFIG=${2:-GPT-XL:384}
case "$CONFIG" in
  GPT-XL:384|GPT-XL:512|GPT-XXL:384) ;;
  *) echo "run_perf_grid.sh: error: MODEL:PX must be GPT-XL:384, GPT-XL:512 or GPT-XXL:384, got $CONFIG" >&2; exit 2 ;;
esac
POLICIES=${3:-dense,adsa-evict,window}
case ",$POLICIES," in
  *,,*) bad=1 ;;
  *) bad=0; for p in ${POLICIES//,/ }; do case "$p" in dense|adsa-evict|window) ;; *) bad=1 ;; esac; done ;;
esac
if [ "$bad" = 1 ] || { [ $# -ge 3 ] && [ "$PART" != 5 ] && [ "$PART" != 6 ]; }; then
  echo "run_perf_grid.sh: error: POLICIES (parts 5 and 6 only) is a comma list of dense, adsa-evict, window," \
    "got '$POLICIES' for part $PART" >&2
  exit 2
fi
LLAMAGEN=third_party/LlamaGen
if [ "$PART" -le 3 ] && [ ! -f "$LLAMAGEN/autoregressive/models/generate.py" ]; then
  echo "run_perf_grid.sh: error: no LlamaGen checkout at $LLAMAGEN (see benchmarks/llamagen_torch.py)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices()[0].device_kind, "| torch", torch.__version__)'

torch_part() {  # tag, timeout s, configs, modes
  echo "== $1: llamagen_torch.py $4 $3"
  timeout "$2" python3 benchmarks/llamagen_torch.py --llamagen "$LLAMAGEN" --configs "$3" --modes "$4" \
    --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1
  echo "rc $?"; grep -E "per call|failed|error" "$OUT/$1.log"
}

case "$PART" in
1)
  echo "== perf_adsa_jax: adsa-jax bench"
  timeout 240 python3 -c 'import sys; from adsa_jax.cli import main; sys.exit(main(sys.argv[1:]))' bench \
    --model GPT-XL --image-size 256,384 --batch 1,64,256 --policies dense --segments 1 --iters 5 \
    --compile-workers 3 --json "$OUT/perf_adsa_jax.json" > "$OUT/perf_adsa_jax.log" 2>&1
  echo "rc $?"; grep -E "GPT-XL|rror" "$OUT/perf_adsa_jax.log" | tail -n 8
  torch_part perf_torch_eager 330 GPT-XL:256:1,GPT-XL:256:64,GPT-XL:256:256,GPT-XL:384:64 eager
  ;;
2) torch_part perf_torch_compile_1 570 GPT-XL:256:1,GPT-XL:256:64 compile ;;
3) torch_part perf_torch_compile_2 570 GPT-XL:256:256,GPT-XL:384:64 compile ;;
4|7)
  b=$([ "$PART" = 4 ] && echo 64 || echo 256)
  echo "== perf_policies_$b: adsa-jax bench, policies against their floors at batch $b"
  timeout 570 python3 -c 'import sys; from adsa_jax.cli import main; sys.exit(main(sys.argv[1:]))' bench \
    --model GPT-XL --image-size 384 --batch "$b" --policies dense,adsa-evict,window --budgets 0.5,0.25 \
    --granularity head,layer --period 1,8 --iters 3 --compile-workers 3 --json "$OUT/perf_policies_$b.json" \
    > "$OUT/perf_policies_$b.log" 2>&1
  echo "rc $?"; grep -E "GPT-XL|share|rror" "$OUT/perf_policies_$b.log" | tail -n 30
  ;;
5|6)
  cap=$([ "$PART" = 5 ] && echo 40 || echo device)
  model=${CONFIG%%:*} px=${CONFIG##*:}
  tag="perf_cap_${cap}_${model}_${px}"
  [ "$POLICIES" != dense,adsa-evict,window ] && tag="${tag}_${POLICIES//,/-}"
  hints=()
  [ -f benchmarks/cap_peaks_h200.json ] && hints=(--peak-hints benchmarks/cap_peaks_h200.json)
  echo "== $tag: adsa-jax bench --memory-cap $cap, $model at $px px, $POLICIES"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 570 python3 -c \
    'import sys; from adsa_jax.cli import main; sys.exit(main(sys.argv[1:]))' bench \
    --model "$model" --image-size "$px" --memory-cap "$cap" --policies "$POLICIES" --budgets 0.5,0.25 \
    --iters 3 --compile-workers 3 ${hints[@]+"${hints[@]}"} --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
  echo "rc $?"; grep -E "GPT-|rror" "$OUT/$tag.log" | tail -n 20
  ;;
9)
  echo "== perf_granularity_256: adsa-evict head and layer at batch 256"
  timeout 300 python3 -c 'import sys; from adsa_jax.cli import main; sys.exit(main(sys.argv[1:]))' bench \
    --model GPT-XL --image-size 384 --batch 256 --policies adsa-evict --budgets 0.5 --granularity head,layer \
    --period 1 --iters 3 --compile-workers 2 --json "$OUT/perf_granularity_256.json" > "$OUT/perf_granularity_256.log" 2>&1
  echo "rc $?"; grep -E "GPT-XL|rror" "$OUT/perf_granularity_256.log" | tail -n 4
  ;;
10)
  echo "== generate_profile: adsa-evict (head, layer; period 1, 8) and window, 384 px batch 64, 0.5"
  OUT="$OUT" timeout 570 python3 benchmarks/generate_profile.py GPT-XL:384:64:adsa-evict:0.5:head \
    GPT-XL:384:64:adsa-evict:0.5:head:8 GPT-XL:384:64:adsa-evict:0.5:layer GPT-XL:384:64:adsa-evict:0.5:layer:8 \
    GPT-XL:384:64:window:0.5 > "$OUT/generate_profile.log" 2>&1
  echo "rc $?"; tail -n 8 "$OUT/generate_profile.log"
  ;;
11|13|15|16)
  echo "== kernel_switch_time: KernelConfig switches on and off"
  if [ "$PART" = 16 ]; then
    cases="GPT-XL:384:64:adsa-evict:0.5:head:1:score_widens_apart GPT-XL:384:256:adsa-evict:0.5:head:1:score_widens_apart"
    cases="$cases GPT-XL:384:64:adsa-evict:0.25:head:1:score_widens_apart"
  elif [ "$PART" = 15 ]; then
    cases="GPT-XL:384:64:adsa-evict:0.5:head:1:widen_by_bits GPT-XL:384:256:adsa-evict:0.5:head:1:widen_by_bits"
    cases="$cases GPT-XL:256:64:dense:widen_by_bits"
  elif [ "$PART" = 11 ]; then
    cases="GPT-XL:384:64:adsa-evict:0.5:head:1:first_choice_scan GPT-XL:384:64:adsa-evict:0.5:layer:1:first_choice_scan"
  else
    cases="GPT-XL:384:64:adsa-evict:0.5:layer:1:layer_choice_in_kernel GPT-XL:384:64:adsa-evict:0.5:head:8:leave_top_in_kernel"
    cases="$cases GPT-XL:384:64:adsa-evict:0.5:head:1:score_tile=(16,1)"
  fi
  mkdir -p "$OUT/switch_$PART"
  OUT="$OUT/switch_$PART" timeout 570 python3 benchmarks/kernel_switch_time.py $cases > "$OUT/switch_$PART/kernel_switch_time.log" 2>&1
  echo "rc $?"; grep -E "a call|rror" "$OUT/switch_$PART/kernel_switch_time.log"
  ;;
12)
  echo "== generate_profile: dense, 256 px batch 1, 64, 256"
  mkdir -p "$OUT/dense"
  OUT="$OUT/dense" timeout 570 python3 benchmarks/generate_profile.py GPT-XL:256:1:dense GPT-XL:256:64:dense \
    GPT-XL:256:256:dense > "$OUT/dense/generate_profile.log" 2>&1
  echo "rc $?"; tail -n 4 "$OUT/dense/generate_profile.log"
  ;;
8|14)
  g=$([ "$PART" = 8 ] && echo command-buffer || echo fma)
  echo "== xla_flag_time: XLA flag settings, $g"
  OUT="$OUT" timeout 570 python3 benchmarks/xla_flag_time.py "$g" > "$OUT/xla_flag_time_$g.log" 2>&1
  echo "rc $?"; cat "$OUT/xla_flag_time_$g.log"
  ;;
esac
