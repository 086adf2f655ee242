"""``adsa-jax eval-demo``: the quality of each policy on the bundled demo model (held-out NLL, KL,
top-1 agreement, classifier accuracy of samples); prints the markdown table, writes the JSON."""
from __future__ import annotations

import json
from pathlib import Path

from ..checks import check_output_file
from ..config import ConfigError
from ..options import IMPLS
from .common import add_sampling_args, log, parser, sampling_from_args, split_list


def add_parser(sub):
    from ..demo import DEMO_SAMPLING

    p = parser(sub, "eval-demo", "quality of each policy on the bundled demo model (held-out NLL, KL, top-1, "
               "classifier accuracy of samples); needs scikit-learn")
    p.add_argument("--gpt", default=None, help="demo checkpoint directory (default: the bundled one)")
    p.add_argument("--policies", default="dense,adsa-select,adsa-evict,window,random",
                   help="comma-separated policies (default: %(default)s)")
    p.add_argument("--budgets", default="0.25,0.5,0.75", help="comma-separated budgets of the sparse policies "
                   "(default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds; accuracy is the mean and std over them "
                   "(default: %(default)s)")
    p.add_argument("--per-seed", type=int, default=50, help="generated images per seed, class i %% 10 "
                   "(default: %(default)s; BENCHMARKS.md used 100)")
    p.add_argument("--heldout", type=int, default=120, help="score the first this many of the 360 held-out images; "
                   "0: all, as BENCHMARKS.md (default: %(default)s; adsa-select is slow on CPU)")
    add_sampling_args(p, cfg_scale=str(DEMO_SAMPLING["cfg_scale"]), temperature=str(DEMO_SAMPLING["temperature"]),
                      top_k=str(DEMO_SAMPLING["top_k"]))
    p.add_argument("--json", default="demo_quality.json", help="write the rows here; '' skips it (default: %(default)s)")
    p.add_argument("--data", default=None, help="the tokenised digits from an .npz written by `python "
                   "examples/train_demo.py --save-data FILE.npz` (default: built with scikit-learn)")
    p.add_argument("--samples", default=None, help="write every generated token array here (.npz, one entry per "
                   "policy/budget/seed); with --rescore, read them from here (default: none)")
    p.add_argument("--no-classify", action="store_true", help="skip the scikit-learn classifier (accuracy left "
                   "empty; needs --samples): classify later with --rescore")
    p.add_argument("--rescore", default=None, metavar="RESULT.json", help="generate nothing: fill in the class "
                   "accuracies of a --no-classify run's JSON from its --samples file, print the table, write --json "
                   "(default: none)")
    p.add_argument("--attention", default="xla", choices=("auto",) + IMPLS,
                   help="decode attention; xla, the reference, measures the same thing on every device "
                        "(default: %(default)s)")
    p.set_defaults(run=run)


def run(a):
    """``--no-classify --samples S.npz`` runs everything but the scikit-learn classifier (e.g. on a
    GPU machine without scikit-learn); ``--rescore RESULT.json --samples S.npz`` adds it afterwards."""
    from ..demo import (DEMO_SAMPLING, classify_samples, format_quality, load_data, load_demo_model,
                        quality_benchmark)
    from ..images import atomic_savez
    from ..options import SamplingConfig

    check_output_file(a.json or None, flag="--json")  # before the generation, not after it
    if not a.rescore:
        check_output_file(a.samples, flag="--samples")
    if a.rescore:
        if not a.samples:
            raise ConfigError("--rescore needs --samples: the .npz the --no-classify run wrote")
        if a.no_classify:
            raise ConfigError("--rescore is the classifying step: drop --no-classify")
        try:
            res = json.loads(Path(a.rescore).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the eval-demo result {a.rescore}: {e}") from None
        if not Path(a.samples).is_file():
            raise ConfigError(f"samples file {a.samples} not found")
        res = classify_samples(res, a.samples, data=load_data(a.data) if a.data else None, log=log)
    else:
        if a.no_classify and not a.samples:
            raise ConfigError("--no-classify needs --samples FILE.npz, to classify the samples later with --rescore")
        sampling = sampling_from_args(a, SamplingConfig(**DEMO_SAMPLING))
        policies = split_list(a.policies, "--policies", unique=True)
        budgets = split_list(a.budgets, "--budgets", float, unique=True)
        seeds = split_list(a.seeds, "--seeds", int, unique=True)
        data = load_data(a.data)  # before the model: a missing scikit-learn / data file fails fast
        model = load_demo_model(a.gpt)
        samples = {} if a.samples else None
        res = quality_benchmark(model, policies=policies, budgets=budgets, seeds=seeds, per_seed=a.per_seed,
                                sampling=sampling, heldout=a.heldout or None, data=data, classify=not a.no_classify,
                                samples=samples, attention=a.attention, log=log)
        if samples is not None:
            atomic_savez(a.samples, **samples)
            log(f"samples -> {a.samples} ({len(samples)} arrays)")
    s = res["settings"]
    print(f"demo model quality ({res['date']}, {res['device']}, {s['heldout_images']} held-out images, "
          f"{len(s['seeds'])} seeds x {s['images_per_seed']} samples, cfg {s['cfg_scale']}, top-k {s['top_k']}, "
          f"{res['wall_s']:.0f} s)")
    print(format_quality(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
        log(f"json -> {a.json}")
    return res
