"""What the commands share: logging and progress on stderr, flag groups, and the builders that
turn flags into the library's option objects (SamplingConfig, a policy, KernelConfig)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..options import IMPLS, KernelConfig, SamplingConfig

DEMO_CLASSES = "207,360,387,974,88,979,417,279"  # LlamaGen sample_c2i.py's labels
LLAMAGEN_SAMPLING = SamplingConfig()  # sample_c2i.py: cfg 4.0, temperature 1.0, top-k 2000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Stopwatch:
    """Elapsed seconds since it was made, for progress lines."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def first_call(what: str):
    """Log ``compiling ...`` before a call that compiles; returns a function that logs the elapsed
    time once it is done (``first_call("the first batch")()``)."""
    log(f"compiling {what} (the first call compiles; later ones reuse the program) ...")
    clock = Stopwatch()
    return lambda: log(f"compiled and ran {what} in {clock():.1f} s")


def parser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every default (each flag's help says %(default)s itself)."""
    return sub.add_parser(name, help=help, description=description or help)


# ----------------------------------------------------------------------------- flag groups


def add_sampling_args(p, *, cfg_scale="4.0", temperature="1.0", top_k="2000", defaults=True):
    """cfg / temperature / top-k / top-p. defaults=False leaves them unset (None) so that a command
    can choose them later (sample: LlamaGen's with --gpt, the demo model's without); the help
    strings then say so."""
    def d(value, cast):
        return cast(value) if defaults else None

    p.add_argument("--cfg-scale", type=float, default=d(cfg_scale, float),
                   help=f"classifier-free guidance scale; <= 1 turns guidance off (default: {cfg_scale})")
    p.add_argument("--cfg-interval", type=float, default=-1,
                   help="guide only the first cfg_interval + 2 image tokens (LlamaGen's cfg_interval); -1 guides "
                        "all (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d(temperature, float),
                   help=f"softmax temperature; 0 samples greedily (default: {temperature})")
    p.add_argument("--top-k", type=int, default=d(top_k, int),
                   help=f"keep the k largest logits, ties kept; 0 turns it off (default: {top_k})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 turns it off (default: %(default)s)")


def sampling_from_args(a, fallback: SamplingConfig = LLAMAGEN_SAMPLING) -> SamplingConfig:
    """The SamplingConfig of the flags; a flag left unset takes ``fallback``'s value."""
    kw = {k: getattr(a, k, None) for k in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")}
    return SamplingConfig(**{k: getattr(fallback, k) if v is None else v for k, v in kw.items()})


def add_policy_args(p):
    from ..cache import POLICY_NAMES

    p.add_argument("--policy", default="dense", metavar="NAME",
                   help=f"KV-cache policy: {', '.join(POLICY_NAMES)} (default: %(default)s)")
    p.add_argument("--budget", type=float, default=None, help="fraction of the image tokens a sparse policy keeps; "
                   "default sizes: prefix one grid row, local two rows, keep the rest (default: 0.5 when no "
                   "--prefix/--keep/--local is given)")
    p.add_argument("--prefix", type=int, default=None, help="image tokens always kept from the start (default: one "
                   "grid row)")
    p.add_argument("--keep", type=int, default=None, help="pool of selected tokens (default: the budget's rest)")
    p.add_argument("--local", type=int, default=None, help="most recent tokens always kept (default: two grid rows)")
    p.add_argument("--granularity", choices=("head", "layer"), default="head",
                   help="score per head or once per layer (default: %(default)s)")
    p.add_argument("--period", type=int, default=1, help="eviction period s of adsa-evict, adsa-evict-all and "
                   "random: s tokens leave the local window together every s steps (default: %(default)s)")


def policy_from_args(cfg, a):
    """The policy object of --policy and its sizes (flags left unset are not passed)."""
    from ..cache import make_policy

    kw = {k: getattr(a, k, None) for k in ("budget", "prefix", "keep", "local")}
    kw = {k: v for k, v in kw.items() if v is not None}
    if getattr(a, "granularity", "head") != "head":
        kw["granularity"] = a.granularity
    if getattr(a, "period", 1) not in (None, 1):
        kw["period"] = a.period
    return make_policy(cfg, a.policy or "dense", **kw)


def add_kernel_args(p, *, attention="auto", segments=1):
    choices = ("auto",) + IMPLS
    p.add_argument("--attention", default=attention, choices=choices,
                   help="decode attention: auto = the Pallas kernels on a GPU (XLA for dense at batch 1-6 over a "
                        "long cache), XLA elsewhere; xla is the reference (default: %(default)s)")
    p.add_argument("--gemm", default="auto", choices=choices,
                   help="decode weight GEMMs: auto = a Pallas split-K GEMV (with one residual add + RMSNorm kernel "
                        "after wo and w2) on one GPU at up to 16 rows of bf16/fp16 weights, XLA elsewhere "
                        "(default: %(default)s)")
    p.add_argument("--segments", type=int, default=segments,
                   help="static length buckets of the decode scan: dense (XLA attention) and adsa-select read only "
                        "the filled part of the cache; more = faster steps, longer compile (default: %(default)s)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode in groups of --invariant-group images (the batch padded to whole groups on every "
                        "device), so an image's tokens do not depend on the batch size, its position or the number "
                        "of data-parallel devices (bf16 included; docs/reliability.md)")
    p.add_argument("--invariant-group", type=int, default=None, metavar="N",
                   help="images a group with --batch-invariant; the guarantee holds between runs with the same N "
                        f"(default: {KernelConfig.invariant_group})")


def kernels_from_args(a) -> KernelConfig:
    invariant, group = bool(getattr(a, "batch_invariant", False)), getattr(a, "invariant_group", None)
    if group is not None and not invariant:
        raise ConfigError("--invariant-group sets the group size of --batch-invariant: add --batch-invariant or "
                          "drop --invariant-group")
    if group is not None and group < 1:
        raise ConfigError(f"--invariant-group must be an integer >= 1, got {group}")
    return KernelConfig(attention=a.attention, gemm=getattr(a, "gemm", "auto"), segments=getattr(a, "segments", 1),
                        batch_invariant=invariant,
                        invariant_group=KernelConfig.invariant_group if group is None else group)


def add_dtype_arg(p, default="bfloat16"):
    p.add_argument("--dtype", default=default, help="compute dtype of the weights: bfloat16, float16 or float32 "
                   "(default: %(default)s)")


# ----------------------------------------------------------------------------- inputs and outputs


def split_list(text: str, flag: str, cast=str, unique: bool = False) -> list:
    """Comma-separated values of a flag (blank items skipped), or a ConfigError naming it. unique: a
    value given twice is refused (a sweep's axis, where it would repeat the work or count a seed twice)."""
    try:
        out = [cast(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated {cast.__name__} values, got {text!r}") from None
    if not out:
        raise ConfigError(f"{flag} is empty")
    if unique:
        twice = [v for i, v in enumerate(out) if v in out[:i]]
        if twice:
            raise ConfigError(f"{flag} lists {twice[0]!r} more than once: give each value once")
    return out


def parse_classes(text, num_classes):
    ids = split_list(text, "--classes", int)
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ConfigError(f"--classes ids {bad} are outside [0, {num_classes - 1}] for this model")
    return np.asarray(ids, np.int32)


def default_classes(num_classes):
    """LlamaGen's demo labels for ImageNet models; the first 8 classes of smaller label sets."""
    return DEMO_CLASSES if num_classes >= 1000 else ",".join(str(i) for i in range(min(8, num_classes)))


def balanced_labels(num_samples, num_classes):
    """Class-balanced labels: image i gets class i % num_classes (as LlamaGen's FID runs on average)."""
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def save_npy(path, arr):
    path = Path(path)
    try:
        np.save(path, arr)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
