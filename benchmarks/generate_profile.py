"""Where a generate call's GPU time goes (GPU): `python3 benchmarks/generate_profile.py [MODEL:PX:BATCH:POLICY[:BUDGET[:GRAN[:PERIOD]]] ...]`.

Random weights, bf16, CFG 4, top-k 2000, default kernel settings (as `adsa-jax bench`, whose
compile_one makes the program). One call is compiled, run once to warm up, then traced; its GPU
kernels are summed by kind (weight GEMMs, attention and cache kernels, sampling, other XLA fusions)
and the rest of the span between the first kernel's start and the last one's end is idle GPU time
(launch gaps). Each row also keeps the 30 longest kernels as [seconds, launches, source]: for an
XLA kernel, the JAX code that made it (the instruction's op_name in the optimized HLO, whose name
the kernel bears, e.g. "evict/..." under jax.named_scope("evict")) and its opcode and shape; and the
program's copies of 1 MiB or more (`copies`: result shape and how many copy instructions make it;
an in-place update XLA cannot prove safe shows up there as a copy of the whole cache). Writes
$OUT/generate_profile.json and prints one line per configuration.
"""
import collections
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpu_trace import gpu_kernel_times  # noqa: E402

import adsa_jax  # noqa: E402
from adsa_jax.bench import compile_one  # noqa: E402
from adsa_jax.config import named_config  # noqa: E402
from adsa_jax.generate import Model  # noqa: E402
from adsa_jax.model import init_params  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
# First match wins: our Pallas kernels are all named adsa_*, so the GEMV (small_matmul, batch 1-8) and
# top-k (kth) kernels are matched before "adsa", and the residual add + RMSNorm kernel is "other".
KINDS = (("gemm", r"gemm|xmma|nvjet|cutlass|cublas|small_matmul|\bdot"), ("other", r"add_norm"),
         ("sampling", r"sort|topk|top_k|kth|\bcub|radix|argmax|threefry|rng|random"),
         ("attention", r"adsa|attention|pallas|mosaic|evict"))


def kind(name: str) -> str:
    return next((k for k, pat in KINDS if re.search(pat, name, re.I)), "other")


BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
COPY = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* copy(?:-start)?\(")


def big_copies(hlo_text: str, least=1 << 20) -> dict:
    """{"dtype[shape]": copy instructions} for the copies of ``least`` bytes or more in optimized HLO."""
    out = collections.Counter()
    for dt, dims in COPY.findall(hlo_text):
        shape = [int(x) for x in dims.split(",") if x]
        if BYTES.get(dt, 4) * math.prod(shape) >= least:
            out[f"{dt}[{dims}]"] += 1
    return dict(out.most_common())


INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([a-z\-]+)\(.*?op_name="([^"]*)"', re.M)
SCOPE = re.compile(r"^jit\([^)]*\)/|while/body/|closed_call/|jit\(([^)]*)\)/")


def hlo_sources(hlo_text: str) -> dict:
    """{kernel name: "op_name scope | opcode shape"} for the instructions of optimized HLO: XLA:GPU
    names a kernel after its instruction, '.' written '_' (fusion.12 -> fusion_12)."""
    out = {}
    for name, shape, op, op_name in INSTR.findall(hlo_text):
        scope = SCOPE.sub(lambda m: f"{m.group(1)}/" if m.group(1) else "", op_name)
        out[name.replace(".", "_")] = f"{scope} | {op} {shape.split('{')[0][:60]}"
    return out


def profile(spec: str) -> dict:
    model, px, batch, pol, *rest = spec.split(":")
    cfg = named_config(model, image_size=int(px))
    budget = float(rest[0]) if rest else None
    gran = rest[1] if len(rest) > 1 else "head"
    period = {"period": int(rest[2])} if len(rest) > 2 else {}
    if len(rest) > 3:
        sys.exit(f"generate_profile.py: {spec!r} has more than MODEL:PX:BATCH:POLICY[:BUDGET[:GRAN[:PERIOD]]]")
    policy = adsa_jax.make_policy(cfg, pol, **({} if pol == "dense" else {"budget": budget, "granularity": gran,
                                                                             **period}))
    m = Model(cfg, init_params(cfg, jax.random.key(0), jnp.bfloat16))
    prep = compile_one(m, int(batch), policy)  # the program bench times, compiled once
    hlo = prep["compiled"].as_text()
    copies, sources = big_copies(hlo), hlo_sources(hlo)
    cond, mask, ids, scalars = prep["args"]
    run = lambda: prep["compiled"](m.params, cond, mask, jax.random.key(1), ids, scalars).block_until_ready()  # noqa: E731
    compile_s = prep["row"]["compile_s"]
    run()
    t0 = time.time()
    run()
    call_s = time.time() - t0
    agg, cnt, span = gpu_kernel_times(run)
    by = {}
    for name, us in agg.items():
        by[kind(name)] = by.get(kind(name), 0.0) + us / 1e6
    busy = sum(by.values())
    row = {"spec": spec, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "compile_s": compile_s,
           "call_s": call_s, "span_s": span / 1e6, "kernels_s": by, "idle_s": span / 1e6 - busy,
           "launches": sum(cnt.values()), "top": {k: [v / 1e6, cnt[k], sources.get(k)] for k, v in agg.most_common(30)},
           "copies": copies}
    shares = " ".join(f"{k} {100 * v / max(span / 1e6, 1e-9):.0f}%" for k, v in sorted(by.items()))
    print(f"{spec}: call {call_s:.3f} s, traced span {span / 1e6:.3f} s: {shares}, idle "
          f"{100 * row['idle_s'] / max(span / 1e6, 1e-9):.0f}% ({row['launches']} kernels); copies >= 1 MiB: "
          f"{copies or 'none'}", flush=True)
    return row


def main(specs):
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for spec in specs:
        rows.append(profile(spec))
        with open(os.path.join(OUT, "generate_profile.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:] or ["GPT-XL:256:64:dense", "GPT-XL:384:64:adsa-evict:0.5:head", "GPT-XL:384:64:adsa-evict:0.5:layer"])
