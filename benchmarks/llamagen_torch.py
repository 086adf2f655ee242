"""Time the original PyTorch LlamaGen sampler (the anchor of BENCHMARKS.md), eager and torch.compile.

    python benchmarks/llamagen_torch.py --llamagen third_party/LlamaGen \\
        --configs GPT-XL:256:1,GPT-XL:256:64,GPT-XL:256:256,GPT-XL:384:64 --modes eager,compile \\
        --out torch_rows.json
    python benchmarks/make_tables.py --add torch_rows.json

What runs is LlamaGen's own code, unchanged: ``GPT_models[name](...)`` from
``autoregressive/models/gpt.py`` with random weights (the speed of a step does not depend on their
values), and ``generate`` from ``autoregressive/models/generate.py``, called as its
``autoregressive/sample/sample_c2i.py`` calls it: bf16, classifier-free guidance 4.0, top-k 2000,
temperature 1, top-p 1, a VQ codebook of 16,384 and a 16x downsampling VQ (256 px: 16x16 tokens).
``compile`` wraps the model as sample_c2i.py's ``--compile`` does: ``torch.compile(model,
mode="reduce-overhead", fullgraph=True)`` (``--compile-mode`` changes the mode). Each configuration
gets a fresh model and, for compile, a fresh compile (``torch._dynamo.reset()``), so no
configuration runs on shapes traced for another. A call is one ``generate`` of a whole batch of
images (prefill + every token), timed between two device synchronisations; ``--warmup`` calls
first (compile, CUDA-graph recording), then the median of ``--iters`` calls. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed calls (weights, caches and temporaries).

Output (``--out``): a JSON list of rows in the schema of ``benchmarks/results.json``, framework
``torch-eager`` or ``torch-compile``, which ``make_tables.py --add`` merges. A configuration that
fails is reported on stderr in one line and leaves no row; the exit status is then 1.

The LlamaGen sources are not part of this repository. Get them with

    git clone https://github.com/FoundationVision/LlamaGen third_party/LlamaGen
    git -C third_party/LlamaGen checkout ce98ec41803a74a90ce68c40ababa9eaeffeb4ec

(the commit read when this script was written, 2024-06-30; ``/third_party/`` is ignored by git, so
a device run carries it as an ignored path). Only ``autoregressive/models/gpt.py``,
``autoregressive/models/generate.py`` and ``utils/drop_path.py`` are imported.

``--model`` also takes a JSON file of LlamaGen ``ModelArgs`` fields (a tiny model for a CPU check);
its own ``block_size`` sets the grid unless ``--image-size`` is given.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

NEEDED = ("autoregressive/models/gpt.py", "autoregressive/models/generate.py", "utils/drop_path.py")
CODEBOOK = 16384  # sample_c2i.py's --codebook-size
DOWNSAMPLE = 16  # sample_c2i.py's --downsample-size
NUM_CLASSES = 1000
FRAMEWORK = {"eager": "torch-eager", "compile": "torch-compile"}


class BenchError(ValueError):
    """A bad argument or a missing dependency (the message names it and the fix)."""


def load_llamagen(root: Path):
    """LlamaGen's ``gpt`` and ``generate`` modules from the checkout ``root``.

    Its directories have no ``__init__.py`` (namespace packages) and ``gpt.py`` imports
    ``utils.drop_path``, a name any installed ``utils`` package would shadow: the three packages
    are registered to point into ``root`` before the import."""
    root = Path(root)
    missing = [p for p in NEEDED if not (root / p).is_file()]
    if missing:
        raise BenchError(f"--llamagen {root}: not a LlamaGen checkout (missing {', '.join(missing)}); get one with "
                         "`git clone https://github.com/FoundationVision/LlamaGen` (see this script's docstring)")
    for name in ("utils", "autoregressive", "autoregressive.models"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = pkg
    for name in ("utils.drop_path", "autoregressive.models.gpt", "autoregressive.models.generate"):
        sys.modules.pop(name, None)
    gpt = importlib.import_module("autoregressive.models.gpt")
    gen = importlib.import_module("autoregressive.models.generate")
    return gpt, gen


def parse_configs(text: str) -> list[tuple[str, int | None, int]]:
    """``MODEL:IMAGE_SIZE:BATCH,...`` (IMAGE_SIZE may be empty for a JSON config: its own grid)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.rsplit(":", 2)
        try:
            if len(parts) != 3:
                raise ValueError
            model, size, batch = parts[0], (int(parts[1]) if parts[1] else None), int(parts[2])
        except ValueError:
            raise BenchError(f"--configs: {item!r} is not MODEL:IMAGE_SIZE:BATCH (e.g. GPT-XL:256:64)") from None
        out.append((model, size, batch))
    if not out:
        raise BenchError("--configs: no configuration given (e.g. GPT-XL:256:64)")
    return out


def check_config(gpt, model: str, image_size: int | None, batch: int) -> None:
    if batch < 1:
        raise BenchError(f"batch must be >= 1, got {batch} ({model})")
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise BenchError(f"model config file not found: {model}")
    elif model not in gpt.GPT_models:
        raise BenchError(f"unknown model {model!r}: one of {', '.join(gpt.GPT_models)} or a JSON file of ModelArgs "
                         "fields")
    if image_size is not None and (image_size < DOWNSAMPLE or image_size % DOWNSAMPLE):
        raise BenchError(f"image size must be a positive multiple of {DOWNSAMPLE}, got {image_size} ({model})")
    if image_size is None and not model.endswith(".json"):
        raise BenchError(f"{model}: give an image size (e.g. {model}:256:{batch})")


def build_model(gpt, model: str, image_size: int | None, device, dtype):
    """A LlamaGen Transformer with random weights, and its image size."""
    import torch

    if model.endswith(".json"):
        try:
            fields = json.loads(Path(model).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"cannot read model config {model}: {e}") from None
        if not isinstance(fields, dict):
            raise BenchError(f"model config {model}: a JSON object of ModelArgs fields expected")
        if image_size is not None:
            fields["block_size"] = (image_size // DOWNSAMPLE) ** 2
        try:
            args = gpt.ModelArgs(**fields)
        except TypeError as e:
            raise BenchError(f"model config {model}: {e}") from None
        grid = int(round(args.block_size ** 0.5))
        if grid * grid != args.block_size:
            raise BenchError(f"model config {model}: block_size {args.block_size} is not a square grid")
        with torch.device(device):
            net = gpt.Transformer(args)
        size = image_size or grid * DOWNSAMPLE
    else:
        latent = image_size // DOWNSAMPLE
        with torch.device(device):  # built on the device: minutes less for GPT-XXL than on the host
            net = gpt.GPT_models[model](vocab_size=CODEBOOK, block_size=latent ** 2, num_classes=NUM_CLASSES,
                                        cls_token_num=1, model_type="c2i")
        size = image_size
    # initialize_weights zeroes the output layer; random logits make top-k filter like a trained model.
    torch.nn.init.normal_(net.output.weight, std=net.config.initializer_range)
    return net.to(device=device, dtype=dtype).eval(), size


def time_config(gpt, gen, model: str, image_size: int | None, batch: int, mode: str, *, iters: int, warmup: int,
                cfg_scale: float, top_k: int, compile_mode: str, device, dtype, seed: int = 0, log=print) -> dict:
    """One configuration in one mode: the results row (without device and date)."""
    import torch

    torch.manual_seed(seed)
    if mode == "compile":
        torch._dynamo.reset()
    net, size = build_model(gpt, model, image_size, device, dtype)
    runner = torch.compile(net, mode=compile_mode, fullgraph=True) if mode == "compile" else net
    classes = net.config.num_classes
    cond = torch.arange(batch, device=device) % classes
    tokens = net.config.block_size
    cuda = torch.device(device).type == "cuda"

    def call():
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        seq = gen.generate(runner, cond, tokens, cfg_scale=cfg_scale, cfg_interval=-1, temperature=1.0, top_k=top_k,
                           top_p=1.0, sample_logits=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if tuple(seq.shape) != (batch, tokens):
            raise RuntimeError(f"generate returned shape {tuple(seq.shape)}, expected {(batch, tokens)}")
        return dt

    for i in range(warmup):
        dt = call()
        log(f"  warm-up {i + 1}/{warmup}: {dt:.3f} s")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [call() for _ in range(iters)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    s = statistics.median(times)
    name = Path(model).stem if model.endswith(".json") else model
    del runner, net
    if cuda:
        torch.cuda.empty_cache()
    return {"framework": FRAMEWORK[mode], "model": name, "image_size": int(size), "batch": batch, "policy": "dense",
            "budget": None, "granularity": None, "img_per_s": round(batch / s, 3), "s_per_image": round(s / batch, 5),
            "peak_gib": None if peak is None else round(peak, 2), "memory_cap_gib": None, "s_per_call": round(s, 4),
            "times": times}


def device_name(device) -> str:
    import platform

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llamagen", default=None, metavar="DIR", help="a LlamaGen checkout (see the docstring)")
    p.add_argument("--configs", default="GPT-XL:256:1,GPT-XL:256:64,GPT-XL:256:256,GPT-XL:384:64",
                   help="comma-separated MODEL:IMAGE_SIZE:BATCH (MODEL: a GPT_models name or a JSON file of "
                        "ModelArgs fields)")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--iters", type=int, default=3, help="timed calls; the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 1 eager, 3 compile: "
                   "compiling, then CUDA-graph warm-up and recording)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode (LlamaGen's sample_c2i.py: reduce-overhead)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--date", default=None, help="the rows' date, YYYY-MM-DD (default: today)")
    p.add_argument("--out", default=None, help="write the rows here (a JSON list, the results.json schema)")
    a = p.parse_args(argv)
    prog = "llamagen_torch.py"
    try:
        if not a.llamagen:
            raise BenchError("--llamagen DIR is required: a checkout of https://github.com/FoundationVision/LlamaGen "
                             "(git clone it, see this script's docstring)")
        if not Path(a.llamagen).is_dir():
            raise BenchError(f"--llamagen {a.llamagen}: no such directory; get one with `git clone "
                             "https://github.com/FoundationVision/LlamaGen` (see this script's docstring)")
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in FRAMEWORK]
        if bad or not modes:
            raise BenchError(f"--modes: {bad or a.modes!r} not among {', '.join(FRAMEWORK)}")
        if a.iters < 1 or (a.warmup is not None and a.warmup < 0):
            raise BenchError(f"--iters must be >= 1 and --warmup >= 0, got {a.iters} and {a.warmup}")
        if not a.cfg_scale >= 0 or a.top_k < 0:
            raise BenchError(f"--cfg-scale must be >= 0 and --top-k >= 0, got {a.cfg_scale} and {a.top_k}")
        date = a.date or datetime.date.today().isoformat()
        try:
            datetime.date.fromisoformat(date)
        except ValueError:
            raise BenchError(f"--date {date!r} is not YYYY-MM-DD") from None
        configs = parse_configs(a.configs)
        try:
            import torch
        except ImportError:
            raise BenchError("PyTorch is not installed (pip install torch): this script times LlamaGen's PyTorch "
                             "sampler") from None
        gpt, gen = load_llamagen(Path(a.llamagen))
        for c in configs:  # every bad configuration fails now, before minutes of timing
            check_config(gpt, *c)
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise BenchError(f"--device {device}: {str(e).splitlines()[0]}") from None
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    # As sample_c2i.py sets them; the Linear/LayerNorm default inits are skipped since
    # initialize_weights draws every weight again.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    setattr(torch.nn.LayerNorm, "reset_parameters", lambda self: None)
    torch.set_grad_enabled(False)
    # LlamaGen's decode loop enters torch.backends.cuda.sdp_kernel, deprecated since torch 2.2: once per token
    warnings.filterwarnings("ignore", message=".*sdp_kernel.*deprecated", category=FutureWarning)
    dtype = getattr(torch, a.dtype)
    dev = device_name(device)
    print(f"device {dev}, torch {torch.__version__}, LlamaGen {a.llamagen}", flush=True)
    rows, failed = [], 0
    for model, size, batch in configs:
        for mode in modes:
            warmup = a.warmup if a.warmup is not None else (3 if mode == "compile" else 1)
            print(f"{model} {size or ''} px batch {batch}, {mode}:", flush=True)
            try:
                r = time_config(gpt, gen, model, size, batch, mode, iters=a.iters, warmup=warmup, cfg_scale=a.cfg_scale,
                                top_k=a.top_k, compile_mode=a.compile_mode, device=device, dtype=dtype,
                                log=lambda s: print(s, flush=True))
            except BenchError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
            except Exception as e:  # noqa: BLE001 - an OOM at one size should not lose the other rows
                failed += 1
                print(f"{prog}: {model} {size} px batch {batch} {mode} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}"[:400], file=sys.stderr, flush=True)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            times = r.pop("times")
            row = {"device": dev, "date": date, **r, "torch": torch.__version__}
            rows.append(row)
            print(f"  {row['s_per_call']:.3f} s per call (median of {', '.join(f'{t:.3f}' for t in times)}), "
                  f"{row['img_per_s']} images/s, peak {row['peak_gib']} GiB", flush=True)
            if a.out:
                Path(a.out).write_text("[\n" + ",\n".join(json.dumps(x) for x in rows) + "\n]\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
