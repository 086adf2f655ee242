"""``adsa-jax compare``: each policy's KV memory and fidelity to dense along one trajectory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..checks import check_output_file
from .common import (add_dtype_arg, add_sampling_args, balanced_labels, default_classes, log,
                     parse_classes, parser, sampling_from_args, split_list)


def add_parser(sub):
    p = parser(sub, "compare", "KV memory and fidelity to dense (per-step KL, top-1 agreement) of each policy "
               "and budget, teacher-forced along one trajectory")
    p.add_argument("--gpt", required=True, help="GPT directory from `adsa-jax convert gpt` (required)")
    p.add_argument("--policies", default="dense,adsa-evict,adsa-select,window,random",
                   help="comma-separated policies (default: %(default)s)")
    p.add_argument("--budgets", default="0.25,0.5,0.75", help="comma-separated budgets of the sparse policies "
                   "(default: %(default)s)")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: LlamaGen's "
                   f"{default_classes(1000)} for ImageNet models, the first 8 classes of smaller label sets; with "
                   "--tokens, class i %% num_classes for row i)")
    p.add_argument("--tokens", default=None, help=".npy of (B, N) tokens to score (default: sample them with dense "
                   "generation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dense trajectory (default: %(default)s)")
    p.add_argument("--prefix", type=int, default=None, help="override the default prefix (one grid row)")
    p.add_argument("--local", type=int, default=None, help="override the default local window (two grid rows)")
    p.add_argument("--granularity", choices=("head", "layer"), default="head",
                   help="score per head or once per layer (default: %(default)s)")
    add_sampling_args(p)
    add_dtype_arg(p, "float32")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file (default: none)")
    p.set_defaults(run=run)


def run(a):
    import jax

    from ..checkpoint import load
    from ..checks import check_seed
    from ..fidelity import compare_policies, format_table

    check_seed(a.seed)
    check_output_file(a.json, flag="--json")  # before the generation, not after it
    policies = split_list(a.policies, "--policies", unique=True)  # before the checkpoint is read
    budgets = split_list(a.budgets, "--budgets", float, unique=True)
    sampling = sampling_from_args(a)
    model = load(a.gpt, dtype=a.dtype)
    cfg = model.config
    if a.tokens:
        tokens = np.load(a.tokens)
        labels = parse_classes(a.classes, cfg.num_classes) if a.classes else balanced_labels(len(tokens), cfg.num_classes)
    else:
        labels = parse_classes(a.classes or default_classes(cfg.num_classes), cfg.num_classes)
        tokens = None
    rows = compare_policies(model, labels, tokens=tokens, policies=policies, budgets=budgets, key=jax.random.key(a.seed),
                            prefix=a.prefix, local=a.local, granularity=a.granularity, sampling=sampling, log=log)
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
        log(f"json -> {a.json}")
    return rows
