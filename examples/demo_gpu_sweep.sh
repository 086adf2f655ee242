#!/usr/bin/env bash
# Train candidate demo models with examples/train_demo.py side by side on one GPU, keep the one with
# the lowest NLL on the validation split (carved from the training images; the held-out split plays
# no part in the choice), then run the quality benchmark (adsa-jax eval-demo) on it. One call of the
# device machine does all of it.
#
#   examples/demo_gpu_sweep.sh OUTDIR [TOTAL_SECONDS]     (from the repository root)
#
# Candidates: BASE_ARGS (every candidate) plus one entry of CANDIDATES (';'-separated) each; later
# arguments override earlier ones. The defaults are the three candidates of the run that selected the
# bundled model (benchmarks/demo_quality.md), run as `EVAL_RESERVE=125 examples/demo_gpu_sweep.sh OUTDIR 200`:
# shift 3 for 1,000 and for 1,500 steps, and shift 2 for 1,000 steps, the one selected and the
# defaults of examples/train_demo.py (~50 s of training each on an H100). Much longer runs (6,000
# steps) memorise the training images: validation NLL is lowest at step 750-1,000 and then climbs.
# A selected model is shipped with
#   python examples/train_demo.py --refresh adsa_jax/data/demo_digits --params-npz OUTDIR/selected_params.npz
# (after unpacking OUTDIR/selected.tar there) on the CPU that runs the tests.
#
# OUTDIR gets: selected.tar (the chosen checkpoint directory), selected_params.npz (its fp32
# params, for `train_demo.py --refresh DIR --params-npz`), logs.tar (every candidate's
# train_log.json and console log), quality.json, samples.npz and eval.log (adsa-jax eval-demo).
# Without scikit-learn on the machine, the data come from ./demo_data.npz (written beforehand with
# `python examples/train_demo.py --save-data demo_data.npz`) and the classifier step is left for
# `adsa-jax eval-demo --rescore OUTDIR/quality.json --samples OUTDIR/samples.npz` elsewhere.
# TOTAL_SECONDS (default 520) bounds the whole script: training stops by then minus EVAL_RESERVE
# (default 260 s; --time-limit, recorded in the log if it acts), the benchmark by then.
# EVAL_ARGS (environment) appends arguments to eval-demo, e.g. for a quick dry run on a CPU.
set -u
OUT=${1:?usage: examples/demo_gpu_sweep.sh OUTDIR [TOTAL_SECONDS]}
TOTAL=${2:-520}
BASE_ARGS=${BASE_ARGS:-"--dim 192 --layers 6 --heads 3 --batch 64 --lr 1e-3 --weight-decay 0.1 --val-fraction 0.1 --eval-every 250"}
CANDIDATES=${CANDIDATES:-"--shift 3 --steps 1000 --warmup 100;--shift 3 --steps 1500 --warmup 100;--shift 2 --steps 1000 --warmup 100"}
IFS=';' read -r -a CANDS <<<"$CANDIDATES"
NAMES=(); for i in "${!CANDS[@]}"; do NAMES+=("c$((i + 1))"); done
WORK=${WORK:-/tmp/demo_sweep}  # candidates' checkpoints (outside OUTDIR: only the chosen one is copied there)
PY=${PYTHON:-python3}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L 2>/dev/null
$PY -c "import jax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'orbax', o.__version__)"

DATA=(); CLASSIFY=()
if ! $PY -c "import sklearn" 2>/dev/null; then
  echo "no scikit-learn: data from demo_data.npz, classifier left for --rescore"
  DATA=(--data demo_data.npz); CLASSIFY=(--no-classify)
fi
# Deterministic scatter-adds (the embedding gradients) where this XLA knows the flag.
if XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" $PY -c "import jax; jax.numpy.zeros(1).block_until_ready()" 2>/dev/null; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi
echo "XLA_FLAGS=${XLA_FLAGS:-}"

TRAIN_LIMIT=$(( TOTAL - $(elapsed) - ${EVAL_RESERVE:-260} ))
echo "[$(elapsed)s] training ${#CANDS[@]} candidates in parallel, --time-limit $TRAIN_LIMIT s"
FRAC=$($PY -c "print(round(0.8 / ${#CANDS[@]}, 3))")  # GPU memory share of each trainer
for i in "${!CANDS[@]}"; do
  c=${NAMES[$i]}; echo "$c: $BASE_ARGS ${CANDS[$i]}"
  # shellcheck disable=SC2086  # the argument strings are meant to split
  XLA_PYTHON_CLIENT_MEM_FRACTION=$FRAC $PY examples/train_demo.py $BASE_ARGS ${CANDS[$i]} "${DATA[@]}" --out "$WORK/$c" \
    --params-npz "$WORK/$c.npz" --time-limit "$TRAIN_LIMIT" >"$WORK/$c.log" 2>&1 &
done
wait
for c in "${NAMES[@]}"; do echo "--- $c"; tr '\r' '\n' <"$WORK/$c.log" | grep -v '^\[' | tail -4; done

BEST=$($PY - "$WORK" "${NAMES[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, names = Path(sys.argv[1]), sys.argv[2:]
rows = []
for c in names:
    f = work / c / "train_log.json"
    if not f.is_file():
        print(f"{c}: no train_log.json", file=sys.stderr)
        continue
    log = json.loads(f.read_text())
    t, fin = log["training"], log["final"]
    if t["selected_val_nll"] is None:
        print(f"{c}: no validation NLL (--val-fraction 0 or --eval-every 0): cannot be compared", file=sys.stderr)
        continue
    rows.append((t["selected_val_nll"], c))
    print(f"{c}: val NLL {t['selected_val_nll']:.4f} at step {t['selected_step']}/{t['steps_run']} "
          f"({t['wall_s']:.0f} s, {t['s_per_step'] * 1e3:.1f} ms/step); held-out {fin['heldout_nll_per_token']:.4f}",
          file=sys.stderr)
if not rows:
    sys.exit(1)
print(min(rows)[1])
EOF
) || { echo "no candidate finished"; tar -cf "$OUT/logs.tar" -C "$WORK" --exclude='*.npz' --exclude='params' .; exit 1; }
echo "[$(elapsed)s] selected: $BEST (lowest validation NLL)"
tar -cf "$OUT/selected.tar" -C "$WORK" "$BEST"
cp "$WORK/$BEST.npz" "$OUT/selected_params.npz"
tar -cf "$OUT/logs.tar" -C "$WORK" --exclude='*.npz' --exclude='params' --exclude='*.npy' .

LEFT=$(( TOTAL - $(elapsed) - 5 ))
echo "[$(elapsed)s] eval-demo on $BEST (timeout ${LEFT}s)"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$LEFT" $PY -m adsa_jax.cli eval-demo --gpt "$WORK/$BEST" \
  --heldout 0 --per-seed 100 "${DATA[@]}" "${CLASSIFY[@]}" --samples "$OUT/samples.npz" --json "$OUT/quality.json" \
  ${EVAL_ARGS:-} 2>&1 | tee "$OUT/eval.log"
echo "[$(elapsed)s] done (eval-demo exit ${PIPESTATUS[0]})"
