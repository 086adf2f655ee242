"""Throughput at equal memory: under a fixed memory cap, the largest batch each policy fits and its images/s.

The grid (the defaults): caps 40 GiB and the whole device ('device': what JAX's allocator may hand
out, with XLA_PYTHON_CLIENT_MEM_FRACTION set to 0.95 here unless already set); dense, adsa-evict
0.5, adsa-evict 0.25 and window 0.5; GPT-XL at 384 and 512 px and GPT-XXL at 384 px; random
weights, bf16, CFG 4, top-k 2000 (LlamaGen's sampling), kernels 'auto'. On one H200, in five
commands of an estimated 5 to 9 minutes each (the whole grid is about 35 minutes, more than one
10-minute command can hold; the 512 px device cap alone is about 11, so it is split by policy):

    python3 benchmarks/throughput_at_equal_memory.py --part N --json eqmem_N.json   # N = 1 ... 5
    for i in 1 2 3 4 5; do python3 benchmarks/make_tables.py --add eqmem_$i.json; done

the parts (``--part N`` is short for these flags):
    1  --configs GPT-XL:384
    2  --configs GPT-XL:512 --caps 40
    3  --configs GPT-XL:512 --caps device --policies dense,adsa-evict:0.5
    4  --configs GPT-XL:512 --caps device --policies adsa-evict:0.25,window:0.5
    5  --configs GPT-XXL:384

Where the time goes: a cache that fills ~130 GiB is read at every step, ~32 ms a step at the
H200's bandwidth and about twice that measured for the sparse layouts, so one call of a sparse
policy under the device cap takes ~35 s at 384 px (577 steps) and ~60 s at 512 px (1,025 steps);
dense, whose cache is half full on average, half that. Each cell runs twice (``--warmup 1 --iters
1``); ``--warmup 0`` halves the timed part. The compiles (2-3 rounds of up to 16 candidates,
``--compile-workers`` at a time) take 2-4 minutes a model.

The search (adsa_jax.bench.cap_search): every candidate batch is compiled ahead of time and its
peak memory read from ``compiled.memory_analysis()`` (arguments + outputs + temporaries, the
weights included) before anything runs, so a batch over the cap is never run; the candidates of
all policies and caps of a model compile ``--compile-workers`` at a time; the chosen batch of
each (policy, cap) then runs ``--warmup`` + ``--iters`` times (median reported). A chosen batch
that runs out of device memory counts as not fitting and the search goes on below it. Batches
are multiples of ``--batch-step`` (8: what a server would pick; the largest fitting batch is
then at most 7 images above the one reported).

Output (``--json``): the JSON of ``adsa-jax bench --memory-cap`` (device, jax, rows; each row has
``memory_cap_gib``, the search's compiled peaks, and on GPU ``peak_bytes_run``, the device's peak
bytes in use during its timed calls when measurable), rewritten after every row, which
``make_tables.py --add`` turns into results rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS, CAPS = "GPT-XL:384,GPT-XL:512,GPT-XXL:384", "40,device"
POLICIES = "dense,adsa-evict:0.5,adsa-evict:0.25,window:0.5"
PARTS = {  # each under 10 minutes on one H200 (the docstring)
    1: {"configs": "GPT-XL:384"},
    2: {"configs": "GPT-XL:512", "caps": "40"},
    3: {"configs": "GPT-XL:512", "caps": "device", "policies": "dense,adsa-evict:0.5"},
    4: {"configs": "GPT-XL:512", "caps": "device", "policies": "adsa-evict:0.25,window:0.5"},
    5: {"configs": "GPT-XXL:384"},
}


def parse_pairs(text: str):
    """``POLICY[:BUDGET],...`` -> [(policy, budget or None)]."""
    from adsa_jax.config import ConfigError

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, budget = item.partition(":")
        try:
            out.append((name, float(budget) if budget else None))
        except ValueError:
            raise ConfigError(f"--policies: {item!r} is not POLICY[:BUDGET] (e.g. adsa-evict:0.5)") from None
    if not out:
        raise ConfigError("--policies is empty")
    return out


def parse_configs(text: str):
    """``MODEL:IMAGE_SIZE,...`` -> [(model, image size)]."""
    from adsa_jax.config import ConfigError

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        model, _, size = item.rpartition(":")
        try:
            out.append((model, int(size)))
        except ValueError:
            raise ConfigError(f"--configs: {item!r} is not MODEL:IMAGE_SIZE (e.g. GPT-XL:384)") from None
        if not model:
            raise ConfigError(f"--configs: {item!r} names no model (e.g. GPT-XL:384)")
    if not out:
        raise ConfigError("--configs is empty")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", type=int, default=None, choices=sorted(PARTS),
                   help="one part of the grid (the docstring), instead of --configs, --caps and --policies")
    p.add_argument("--configs", default=None, help=f"comma-separated MODEL:IMAGE_SIZE (default: {CONFIGS})")
    p.add_argument("--policies", default=None, help=f"comma-separated POLICY[:BUDGET] (default: {POLICIES})")
    p.add_argument("--caps", default=None, help=f"comma-separated GiB, or 'device' (default: {CAPS})")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile-workers", type=int, default=12)
    p.add_argument("--start", type=int, default=64, help="the search's first batches: START and 2 x START")
    p.add_argument("--batch-step", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--attention", default="auto", help="KernelConfig attention (default: auto)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring bandwidth and matmul rate")
    p.add_argument("--json", default=None, help="write the rows here (the JSON of adsa-jax bench --memory-cap)")
    a = p.parse_args(argv)

    import jax

    from adsa_jax import bench
    from adsa_jax.cache import make_policy
    from adsa_jax.config import ConfigError
    from adsa_jax.options import KernelConfig, SamplingConfig

    try:
        if a.part is not None:
            given = [f"--{k}" for k in ("configs", "caps", "policies") if getattr(a, k) is not None]
            if given:
                raise ConfigError(f"--part {a.part} sets the configs, caps and policies: leave out {', '.join(given)}")
            for k, v in PARTS[a.part].items():
                setattr(a, k, v)
        a.configs, a.caps, a.policies = a.configs or CONFIGS, a.caps or CAPS, a.policies or POLICIES
        configs, pairs = parse_configs(a.configs), parse_pairs(a.policies)
        if a.iters < 1 or a.warmup < 0 or a.compile_workers < 1:
            raise ConfigError(f"--iters and --compile-workers must be >= 1 and --warmup >= 0, got {a.iters}, "
                              f"{a.compile_workers} and {a.warmup}")
        specs = [bench.bench_models([m], [px])[0] for m, px in configs]
        for spec in specs:  # bad policies and budgets fail now, before the device measurement
            [make_policy(spec.config, name, budget=budget) for name, budget in pairs]
        caps = bench.resolve_memory_caps([c.strip() for c in a.caps.split(",") if c.strip()])
        bench.BatchSearch(1, start=a.start, align=a.batch_step, max_batch=a.max_batch)
        options = KernelConfig(attention=a.attention)
    except ConfigError as e:
        print(f"throughput_at_equal_memory.py: error: {e}", file=sys.stderr)
        return 2
    sampling = SamplingConfig()  # LlamaGen's: CFG 4, top-k 2000
    device = None if a.no_roofline else bench.measure_device()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if device:
        log(f"device {device['device']}: copy {device['bandwidth'] / 1e12:.2f} TB/s, "
            f"bf16 matmul {device['matmul_flops'] / 1e12:.0f} TFLOP/s")
    log("caps: " + ", ".join(f"{g:g} GiB" for g, _ in caps))
    rows = []
    for spec in specs:
        log(f"== {spec.name} {spec.image_size} px")
        model = spec.build(a.dtype)
        items = [{"policy": make_policy(model.config, name, budget=budget), "budget": budget, "options": options,
                  "sampling": sampling} for name, budget in pairs]
        for i, cap, r in bench.cap_search(model, items, caps, start=a.start, align=a.batch_step,
                                          max_batch=a.max_batch, workers=a.compile_workers, iters=a.iters,
                                          warmup=a.warmup, device=device, log=log):
            r.update(name=spec.name, source=spec.source, image_size=spec.image_size, budget=items[i]["budget"])
            r.setdefault("grid", model.config.grid)
            rows.append(r)
            log(bench.format_cap_rows([r]).splitlines()[-1])
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"device": device, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                               "memory_caps_gib": [g for g, _ in caps],
                               "rows": rows}, f, indent=1)
        del model
    print(bench.format_cap_rows(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before JAX starts: 'device' = most of the GPU
    sys.exit(main())
