"""``adsa-jax bench``: speed, memory and roofline of generate over models, sizes, policies and batches."""
from __future__ import annotations

from ..config import ConfigError
from .common import (add_dtype_arg, add_kernel_args, add_sampling_args, kernels_from_args, log, parser,
                     sampling_from_args, split_list)


def add_parser(sub):
    p = parser(sub, "bench", "speed, memory and roofline of generate (random weights of named sizes or JSON configs, "
               "or a converted checkpoint)")
    p.add_argument("--model", default=None, help="comma-separated named sizes (e.g. GPT-B,GPT-XL) and/or JSON files "
                   "of LlamaGen ModelArgs fields, run with random weights (default: GPT-B)")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="GPT directory from `adsa-jax convert gpt`: "
                   "benchmark its weights at its own image size, instead of --model (default: none)")
    p.add_argument("--image-size", default=None, help="comma-separated, e.g. 256,384 (default: 256 for named sizes, "
                   "the block_size of a JSON config, the checkpoint's own size)")
    p.add_argument("--type", dest="model_type", choices=("c2i", "t2i"), default=None,
                   help="named sizes: class- or text-conditional; t2i runs on zero caption features (default: c2i, "
                        "or what the JSON config / checkpoint says)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes in images; CFG doubles the rows "
                   "(default: %(default)s)")
    p.add_argument("--policies", default="dense", help="comma-separated policies (default: %(default)s)")
    p.add_argument("--budgets", default="0.5", help="comma-separated budgets of the sparse policies "
                   "(default: %(default)s)")
    p.add_argument("--granularity", default="head", help="comma-separated granularities (head, layer) of the scored "
                   "policies (adsa-*, h2o) (default: %(default)s)")
    p.add_argument("--period", default="1", help="comma-separated eviction periods s of adsa-evict, adsa-evict-all "
                   "and random (default: %(default)s)")
    add_dtype_arg(p)
    p.add_argument("--iters", type=int, default=3, help="timed calls per configuration; the median is reported "
                   "(default: %(default)s)")
    add_sampling_args(p)
    add_kernel_args(p, segments=4)
    p.add_argument("--compile-workers", type=int, default=1, help="compile this many configurations at once "
                   "(threads; compile times then overlap) (default: %(default)s)")
    p.add_argument("--memory-cap", default=None, metavar="GIB,...", help="instead of --batch: for each cap (GiB, "
                   "or 'device': all the device's allocator may hand out), the largest batch whose compiled peak "
                   "memory fits, and its speed (default: none)")
    p.add_argument("--max-batch", type=int, default=4096, help="with --memory-cap: the largest batch tried "
                   "(default: %(default)s)")
    p.add_argument("--batch-step", type=int, default=1, help="with --memory-cap: the batches tried are multiples of "
                   "this (default: %(default)s)")
    p.add_argument("--peak-hints", default=None, metavar="FILE", help="with --memory-cap: compiled peaks from an "
                   "earlier compile for this device (benchmarks/cap_peaks.py writes them without a GPU), where each "
                   "search starts; the chosen batches are still compiled and checked here (default: none)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring bandwidth and matmul rate")
    p.add_argument("--json", default=None, help="write the rows (and device, versions) as JSON (default: none)")
    p.set_defaults(run=run)


def run(a):
    from ..bench import format_rows, format_shares, run as sweep, selection_shares

    def axis(text, flag, cast=str):  # a sweep's axis: each value once
        return split_list(text, flag, cast, unique=True)

    sizes = axis(a.image_size, "--image-size", int) if a.image_size else None
    if a.peak_hints is not None and a.memory_cap is None:
        raise ConfigError("--peak-hints goes with --memory-cap (it starts the batch searches); add --memory-cap GIB")
    common = dict(models=axis(a.model, "--model") if a.model else None, image_sizes=sizes, checkpoint=a.checkpoint,
                  model_type=a.model_type, policies=axis(a.policies, "--policies"),
                  budgets=axis(a.budgets, "--budgets", float), dtype=a.dtype, iters=a.iters,
                  sampling=sampling_from_args(a), json_path=a.json, measure=not a.no_roofline, log=log,
                  options=kernels_from_args(a), compile_workers=a.compile_workers,
                  granularities=axis(a.granularity, "--granularity"), periods=axis(a.period, "--period", int))
    if a.memory_cap is not None:
        from ..bench import format_cap_rows, run_memory_cap

        _, rows = run_memory_cap(caps=axis(a.memory_cap, "--memory-cap"), max_batch=a.max_batch, align=a.batch_step,
                                 peak_hints=a.peak_hints, **common)
        print(format_cap_rows(rows))
        return rows
    _, rows = sweep(batches=axis(a.batch, "--batch", int), **common)
    print(format_rows(rows))
    shares = selection_shares(rows)
    if shares:
        print(format_shares(shares))
    return rows
