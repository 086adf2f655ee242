"""``adsa-jax plan``: per-device memory of a generate call on a mesh, compiled ahead of time on fake
devices (no weights allocated), and the largest batch per device that fits given memory sizes
(adsa_jax/plan.py)."""
from __future__ import annotations

import json
from pathlib import Path

from ..checks import check_output_file
from ..config import ConfigError
from .common import add_dtype_arg, add_policy_args, log, parser, policy_from_args


def add_parser(sub):
    from ..plan import HBM_GIB

    p = parser(sub, "plan", "per-device memory of a generate call on a (data x model) mesh, compiled ahead of "
               "time on fake CPU devices, and the largest batch per device that fits each memory size")
    p.add_argument("--model", required=True, help="a named size (GPT-B ... GPT-7B) or a JSON file of LlamaGen "
                   "ModelArgs fields (required)")
    p.add_argument("--image-size", type=int, default=None, help="image size in pixels, e.g. 384 (required with a "
                   "named size; a JSON config's block_size otherwise)")
    p.add_argument("--type", dest="model_type", choices=("c2i", "t2i"), default="c2i",
                   help="class- or text-conditional (default: %(default)s)")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL mesh, e.g. 4x2: batches split over DATA, heads and "
                   "FFN over MODEL (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="images per device (the call's batch is this times the "
                   "device count); required unless --largest")
    p.add_argument("--largest", action="store_true", help="search the largest batch per device that fits each "
                   "--hbm size (several compiles)")
    p.add_argument("--hbm", default=",".join(HBM_GIB), help="memory per device: GiB numbers or names "
                   f"({', '.join(f'{k} {v:g}' for k, v in HBM_GIB.items())}) (default: %(default)s)")
    p.add_argument("--full-depth", action="store_true", help="compile every layer (default: compile 1 and 2 "
                   "layers and extrapolate, which is faster)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale; > 1 doubles the batch rows "
                   "(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=2000, help="top-k of the sampler (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p < 1 adds a sort of the logits "
                   "(default: %(default)s)")
    add_dtype_arg(p)
    add_policy_args(p)
    p.add_argument("--json", default=None, help="also write the result as JSON (default: none)")
    p.set_defaults(run=run)


def run(a):
    from ..config import config_from_arg
    from ..options import SamplingConfig
    from ..plan import GIB, Spec, ensure_devices, format_memory, largest_batch, memory, parse_hbm, parse_mesh

    check_output_file(a.json, flag="--json")  # before the compiles, not after them
    data, model = parse_mesh(a.mesh)
    hbm = parse_hbm(a.hbm)
    if a.batch is None and not a.largest:
        raise ConfigError("give --batch N (images per device) or --largest")
    if a.batch is not None and a.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {a.batch}")
    cfg = config_from_arg(a.model, image_size=a.image_size, model_type=a.model_type)
    spec = Spec(cfg, policy_from_args(cfg, a), data=data, model=model, dtype=a.dtype,
                sampling=SamplingConfig(cfg_scale=a.cfg_scale, top_k=a.top_k, top_p=a.top_p))
    ensure_devices(data * model)  # checked above without a device; before anything touches one
    layers = None if a.full_depth else 2
    result = {"spec": spec.describe(), "hbm_gib": hbm}
    log(f"planning {spec.describe()} on {data * model} {'fake CPU ' if _on_cpu() else ''}devices "
        f"({'every layer' if layers is None else '1 and 2 layers, extrapolated'}) ...")
    if a.batch is not None:
        row = memory(spec, a.batch, layers=layers)
        print(format_memory(spec, row, hbm))
        result["memory"] = _plain(row)
    if a.largest:
        found = largest_batch(spec, [h * GIB for h in hbm], layers=layers, log=log)
        for h in hbm:
            b = found["largest"][h * GIB]
            print(f"largest batch per device that fits {h:g} GiB: {b}" + (f" ({b * data * model} in all)" if b else
                                                                          " (not even one image)"))
        result["largest"] = {f"{h:g}": found["largest"][h * GIB] for h in hbm}
        result["probes"] = {str(b): _plain(r) for b, r in sorted(found["rows"].items())}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
        log(f"json -> {a.json}")
    return result


def _on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def _plain(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
