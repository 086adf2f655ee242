"""The fidelity lab: does ADSA's choice of tokens beat dropping them at random? One command per stage.

    python examples/fidelity/lab.py fetch    [--data-dir D]   # npm pack the pinned emoji tarballs (hash-checked)
    python examples/fidelity/lab.py tokenize [--data-dir D]   # 48x48 RGB -> 24x24 k-means codes, split, diagnostic set
    python examples/fidelity/lab.py judge    [--data-dir D]   # the classifier of generated images -> D/classifier.npz
    python examples/fidelity/lab.py train    [--data-dir D] [--run R] [--time-limit S]   # 3 seeds on one GPU, resumable
    python examples/fidelity/lab.py evaluate [--data-dir D] [--run R]   # every policy x budget x seed -> R/eval.json
    python examples/fidelity/lab.py run      [--data-dir D] [--run R] [--time-limit S]   # train + evaluate, one process
    python examples/fidelity/lab.py report   [--run R]        # results/summary.json, the README table, plots
    python examples/fidelity/lab.py export   [--run R] --out O  # one seed's best weights (bf16) + tokenizer -> O
    python examples/fidelity/lab.py smoke    [--work W]       # the whole pipeline on tiny synthetic data, CPU

D defaults to $ADSA_LAB_DATA or ~/.cache/adsa_jax/fidelity (outside the repo: images are never committed);
R to D/run. Every stage resumes: finished outputs are reused, training restarts from its last checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the lab's own modules (data, train, evaluate, report) sit beside this file

import data as lab_data  # noqa: E402
from adsa_jax.config import ConfigError  # noqa: E402


def default_data_dir() -> Path:
    return Path(os.environ.get("ADSA_LAB_DATA", Path.home() / ".cache" / "adsa_jax" / "fidelity"))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="stage", required=True)

    def common(q):
        q.add_argument("--data-dir", type=Path, default=default_data_dir(),
                       help="tarballs and tokens (default: $ADSA_LAB_DATA or %(default)s)")
        q.add_argument("--run", type=Path, default=None, help="training run directory (default: DATA_DIR/run)")

    common(sub.add_parser("fetch", help="npm pack the pinned tarballs into --data-dir"))
    q = sub.add_parser("tokenize", help="images -> 24x24 tokens, split, diagnostic set")
    common(q)
    q.add_argument("--codes", type=int, default=1024, help="k-means codebook size (default %(default)s)")
    q.add_argument("--iters", type=int, default=20, help="k-means iterations (default %(default)s)")
    def train_args(q, time_limit):
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds (default %(default)s)")
        q.add_argument("--batch", type=int, default=64, help="sequences per step and seed (default %(default)s)")
        q.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default %(default)s)")
        q.add_argument("--warmup", type=int, default=300, help="warm-up steps (default %(default)s)")
        q.add_argument("--steps", type=int, default=0, help="total steps; 0 sizes the run to the time limit on the "
                       "first call (default %(default)s)")
        q.add_argument("--dim", type=int, default=512, help="model width (default %(default)s)")
        q.add_argument("--layers", type=int, default=12, help="layers (default %(default)s)")
        q.add_argument("--heads", type=int, default=8, help="heads (default %(default)s)")
        q.add_argument("--eval-every", type=int, default=250, help="held-out NLL every this many steps (default %(default)s)")
        q.add_argument("--time-limit", type=float, default=time_limit, help="stop (with a checkpoint; resumable) "
                       "before this many seconds (default %(default)s)")

    def eval_args(q):
        q.add_argument("--images", type=int, default=256, help="held-out images scored per seed (default %(default)s)")
        q.add_argument("--samples", type=int, default=100, help="images generated per policy and seed (default %(default)s)")
        q.add_argument("--classifier-steps", type=int, default=3000, help="the judge's training steps, when neither "
                       "RUN nor DATA_DIR holds classifier.npz (default %(default)s)")
        q.add_argument("--grid-spec", default="full", choices=["full", "smoke"], help="which policy grid (default %(default)s)")

    q = sub.add_parser("judge", help="train the classifier of generated images once, into DATA_DIR/classifier.npz "
                       "(evaluate trains it otherwise)")
    common(q)
    q.add_argument("--classifier-steps", type=int, default=3000, help="training steps (default %(default)s)")
    q = sub.add_parser("train", help="train the seeds (resumes from the last checkpoint)")
    common(q)
    train_args(q, 540)
    q = sub.add_parser("evaluate", help="every policy x budget x seed")
    common(q)
    eval_args(q)
    q.add_argument("--time-limit", type=float, default=560, help="stop (resumable) after this many seconds "
                   "(default %(default)s)")
    q.add_argument("--checkpoint", default="best", choices=["best", "last"], help="the held-out optimum or the "
                   "last step (default %(default)s)")
    q = sub.add_parser("run", help="train, then evaluate the held-out optimum, in one process: the evaluation's "
                       "programs compile while training runs (for a GPU job that keeps no files afterwards)")
    common(q)
    train_args(q, 580)
    eval_args(q)
    q.add_argument("--eval-seconds", type=float, default=200, help="of --time-limit, kept for the evaluation: "
                   "training stops early to leave it (default %(default)s)")
    q = sub.add_parser("report", help="summary.json, README table, plots")
    common(q)
    q.add_argument("--out", type=Path, default=HERE / "results", help="report directory (default %(default)s)")
    q.add_argument("--longer-run", type=Path, help="summary.json of a longer schedule's run (same seeds): when it "
                   "overfit and got no lower, this run counts as converged though its cosine tail still falls")
    q = sub.add_parser("export", help="one seed's held-out optimum as an adsa_jax checkpoint (bf16) with the tokenizer")
    common(q)
    q.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    q.add_argument("--seed-index", type=int, default=0, help="which of the run's seeds, by position (default %(default)s)")
    q = sub.add_parser("smoke", help="the whole pipeline on tiny synthetic data (CPU, no network)")
    q.add_argument("--work", type=Path, required=True, help="scratch directory for the smoke run")
    return p.parse_args(argv)


def train_kw(a) -> dict:
    return dict(seeds=tuple(a.seeds), batch=a.batch, peak_lr=a.lr, warmup=a.warmup, total_steps=a.steps, dim=a.dim,
                layers=a.layers, heads=a.heads, eval_every=a.eval_every)


def main(argv=None) -> int:
    a = parse(argv)
    try:
        if a.stage == "smoke":
            import smoke
            smoke.run(a.work, log=log)
            return 0
        run = a.run or a.data_dir / "run"
        if a.stage == "fetch":
            lab_data.fetch(a.data_dir)
        elif a.stage == "tokenize":
            if (a.data_dir / "tokens.npz").is_file():
                log(f"tokenize: {a.data_dir / 'tokens.npz'} exists (delete it to redo)")
            else:
                lab_data.tokenize(a.data_dir, a.data_dir, codes=a.codes, iters=a.iters, log=log)
        elif a.stage == "judge":
            import evaluate
            out = a.data_dir / "classifier.npz"
            if out.is_file():
                log(f"judge: {out} exists (move it away to train another)")
            else:
                tokens = a.data_dir / "tokens.npz"
                if not tokens.is_file():
                    raise lab_data.DataError(f"{tokens} is missing: run `lab.py tokenize --data-dir {a.data_dir}` first")
                import numpy as np

                evaluate.train_judge(np.load(tokens), lab_data.load_tokenizer(a.data_dir / "tokenizer.npz"), out,
                                     steps=a.classifier_steps, log=log)
        elif a.stage == "train":
            import train
            train.train(a.data_dir / "tokens.npz", run, **train_kw(a), time_limit=a.time_limit, log=log)
        elif a.stage in ("evaluate", "run"):
            import evaluate
            t0 = time.time()
            programs = None
            if a.stage == "run":  # the programs compile in threads while the main thread trains
                import train
                cfg = train.data_config(a.data_dir / "tokens.npz", dim=a.dim, layers=a.layers, heads=a.heads)
                inputs = evaluate.Inputs(a.data_dir, a.images, a.samples)
                programs = evaluate.Programs(cfg, len(a.seeds), inputs)
                left = a.time_limit - a.eval_seconds - (time.time() - t0)
                train.train(a.data_dir / "tokens.npz", run, **train_kw(a), time_limit=left, log=log,
                            on_compiled=lambda: programs.start(a.grid_spec, log=log))
            evaluate.evaluate(a.data_dir, run, images=a.images, samples=a.samples, grid=a.grid_spec,
                              classifier_steps=a.classifier_steps, time_limit=a.time_limit - (time.time() - t0),
                              checkpoint=getattr(a, "checkpoint", "best"), programs=programs, log=log)
            sys.stderr.flush()
            os._exit(0)  # results are written; do not wait for compile threads past the time limit
        elif a.stage == "export":
            import train
            train.export(run, a.out, a.data_dir, seed_index=a.seed_index, log=log)
        elif a.stage == "report":
            import report
            report.report(run, a.out, data_dir=a.data_dir, longer=a.longer_run, log=log)
    except (lab_data.DataError, ConfigError) as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
