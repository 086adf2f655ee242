"""Benchmark harness: compile time, seconds per generate call, images/s, ms per step, compiled
peak memory, KV bytes, and the roofline floor of each configuration (GPU/TPU; CPU works too).

Timing: the jitted generate is lowered and compiled explicitly (compile time measured on its
own), then called ``warmup`` times and ``iters`` times; the median call is reported.
Roofline: per decode step the weights (minus the embedding tables, of which only a row is read)
plus the KV entries the policy actually reads, over the measured copy bandwidth; and the matmul
FLOPs over the measured bf16 matmul rate. The floor for a call is the larger of the two summed
over the N steps; ``achieved_fraction`` (the table's "of floor") = floor / measured. The kernel
floor (``floor_kernel_s``, "of k-floor") takes that larger of bytes and FLOPs for the weight GEMMs
and for the attention of each step on their own, since one runs after the other: with CFG at batch
256 (512 rows) a weight GEMM does 512 FLOPs a byte, past the H100's and H200's ridge (about 200
and 145), so there the GEMMs are bound by the matmul rate, not by their bytes.

Models: named sizes and JSON files of LlamaGen ``ModelArgs`` fields run with random weights (the
speed of a step does not depend on their values); a converted checkpoint directory runs with its
own weights at the grid it was converted for (:func:`bench_models`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import load, read_meta
from .checks import check_count, check_granularity, check_output_file, check_period
from .config import ConfigError, GPTConfig, config_from_arg, grid_for_image_size, is_config_file
from .cache import PERIOD_POLICIES, kv_bytes, make_policy
from .generate import Model, _scalars, generate_program, with_kernels
from .model import init_params
from .options import KernelConfig, SamplingConfig, kernel_config


def measure_device(size_mb: int = 1024, n: int = 8192, reps: int = 20, trials: int = 10):
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s.

    Each timed call loops ``reps`` times inside one jitted program, so the host's dispatch and
    sync (tens of microseconds against a ~0.7 ms pass over 1 GiB) do not count: timed call by call,
    the H200's copy rate read 2.5-3.2 TB/s between processes. The rates are the best of ``trials``
    calls, since a floor must stay below what the device did: the median matmul rate of an H100
    read 464 to 546 TFLOP/s between runs (2026-12-05), and a 40 GiB run at the lowest came out at
    0.99x of its kernel floor. ``matmul_flops_median`` keeps the median beside it."""
    x = jnp.ones((size_mb * 2**20 // 4,), jnp.float32) + jax.random.uniform(jax.random.key(0), ())

    def times(f, *args, calls):  # seconds of each of ``calls`` calls, after one to compile and warm up
        f(*args).block_until_ready()
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            out.append(time.perf_counter() - t0)
        return out

    # Loop-variant bodies, so XLA can neither hoist nor fold the passes.
    copy = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda i, y: y * 1.0001, a))
    copy_bw = 2 * x.nbytes / (min(times(copy, x, calls=trials)) / reps)
    # Decode mostly reads (weights, KV): a read-only reduction is the relevant ceiling.
    rows = x.reshape(-1, 4096)  # (R, 4096)
    read = jax.jit(lambda a: jax.lax.fori_loop(
        0, reps, lambda i, acc: acc + jnp.sum(a + i.astype(jnp.float32), axis=1), jnp.zeros(a.shape[0], jnp.float32)))
    read_bw = x.nbytes / (min(times(read, rows, calls=trials)) / reps)
    bw = max(copy_bw, read_bw)
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    ts = times(jax.jit(lambda p, q: p @ q), a, b, calls=trials)
    return {"bandwidth": bw, "copy_bandwidth": copy_bw, "read_bandwidth": read_bw,
            "matmul_flops": 2 * n**3 / min(ts), "matmul_flops_median": 2 * n**3 / statistics.median(ts),
            **device_name()}


def device_name() -> dict:
    """The device entry of a bench JSON when the roofline is not measured: its name only."""
    return {"device": str(jax.devices()[0].device_kind)}


def roofline(cfg: GPTConfig, policy, rows: int, batch: int, dtype, device: dict) -> dict:
    """Floor seconds per generate call for this configuration."""
    isz = jnp.dtype(dtype).itemsize
    E, F, V, L = cfg.dim, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layer
    per_layer = 3 * E * E + E * E + 3 * E * F
    w_bytes = (L * per_layer + E * V) * isz
    n = cfg.num_image_tokens
    kv_entry = 2 * L * cfg.n_head * cfg.head_dim * isz  # K and V of one slot over all layers, one row
    attended = [policy.attended(t) for t in range(n - 1)]
    kv_read = rows * kv_entry * float(np.sum(attended))
    steps = n
    bytes_total = steps * w_bytes + kv_read
    gemm_flops = 2 * rows * (L * per_layer + E * V)  # one step's weight GEMMs
    attn_flops = 4 * rows * cfg.dim * float(np.sum(attended)) * L  # QK and PV over the call
    flops = steps * gemm_flops + attn_flops
    bw, mm = device["bandwidth"], device["matmul_flops"]
    t_mem = bytes_total / bw
    t_flop = flops / mm
    # Per kernel kind: attention reads about a byte per FLOP (bf16), always below the ridge, so
    # summing its larger term over the call equals summing it step by step.
    t_kernel = steps * max(w_bytes / bw, gemm_flops / mm) + max(kv_read / bw, attn_flops / mm)
    return {"floor_s": max(t_mem, t_flop), "floor_mem_s": t_mem, "floor_flop_s": t_flop,
            "floor_kernel_s": t_kernel, "bytes_per_call": bytes_total, "flops_per_call": flops}


def compiled_peak_bytes(compiled) -> int | None:
    """A compiled program's peak device memory from its memory analysis: arguments + outputs +
    temporaries - the outputs aliased to arguments; None where the backend reports none."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - getattr(mem, "alias_size_in_bytes", 0))


def compile_one(model: Model, batch: int, policy, *, sampling: SamplingConfig = SamplingConfig(), seed=0,
                options: KernelConfig | None = None) -> dict:
    """Lower and compile one configuration; returns the executable, its arguments and the row
    so far (compile time, compiled peak memory, KV bytes). Thread-safe: XLA compiles without
    the GIL, so a sweep can compile many configurations at once (:func:`run`).

    options: the KernelConfig to resolve (:func:`adsa_jax.options.kernel_config`); its segments
    (length buckets) apply to dense with XLA attention and adsa-select: the Pallas kernel reads
    just the filled slots without them."""
    cfg = model.config
    use_cfg = sampling.guided
    rows = batch * (2 if use_cfg else 1)
    # options.batch_invariant: kernels resolved for one group, the batch padded to whole groups (as
    # generate does); the padding is work the call does, so it counts against images/s.
    invariant = options is not None and options.batch_invariant
    group_rows = options.invariant_group * (2 if use_cfg else 1) if invariant else rows
    kc = kernel_config(cfg, policy, group_rows, model.dtype, base=options)
    policy = with_kernels(policy, kc, options)
    attn = getattr(policy, "attention", "xla")
    padded = -(-batch // kc.invariant_group) * kc.invariant_group if invariant else batch
    if cfg.model_type == "t2i":
        # Zero caption features, every token valid: shapes are static, so a step costs the same
        # whatever the caption says.
        cond = jnp.zeros((padded, cfg.cls_token_num, cfg.caption_dim), jnp.float32)
        mask = jnp.ones((padded, cfg.cls_token_num), bool)
    else:
        cond = jnp.asarray(np.arange(padded) % max(cfg.num_classes, 1), jnp.int32)
        mask = jnp.ones((padded, 1), bool)
    ids = jnp.arange(padded, dtype=jnp.int32)
    scalars = _scalars(sampling)
    t0 = time.perf_counter()
    lowered = generate_program(kc).lower(model.params, cond, mask, jax.random.key(seed), ids, scalars, cfg=cfg,
                                         policy=policy, use_cfg=use_cfg, kernels=kc,
                                         top_p_on=sampling.top_p_on)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    peak = compiled_peak_bytes(compiled)
    row = {
        "type": cfg.model_type, "layers": cfg.n_layer, "dim": cfg.dim, "grid": cfg.grid, "batch": batch, "cfg": use_cfg,
        "policy": policy.name, "prefix": getattr(policy, "prefix", None), "keep": getattr(policy, "keep", None),
        "local": getattr(policy, "local", None), "segments": kc.segments, "attention": attn, "dtype": str(model.dtype),
        "gemm": kc.gemm if kc.gemm != "xla" else "cublas" if kc.cublas else "xla-default", "compile_s": compile_s,
        "peak_bytes_compiled": peak, "kv_bytes": kv_bytes(policy, cfg, group_rows if invariant else rows, model.dtype),
        "batch_invariant": kc.invariant_group if invariant else None,  # its group size (one group's KV at a time)
    }
    return {"compiled": compiled, "args": (cond, mask, ids, scalars), "policy": policy, "rows": rows, "row": row}


def time_one(model: Model, prepared: dict, *, iters=3, warmup=1, device=None, seed=0) -> dict:
    """Run a compiled configuration ``warmup`` + ``iters`` times; the row with the median call."""
    cond, mask, ids, scalars = prepared["args"]
    compiled, res = prepared["compiled"], dict(prepared["row"])
    times = []
    for i in range(warmup + iters):
        t1 = time.perf_counter()
        compiled(model.params, cond, mask, jax.random.key(seed + i), ids, scalars).block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t1)
    sec = statistics.median(times) if times else float("nan")
    res.update(s_per_call=sec, images_per_s=res["batch"] / sec, ms_per_step=1e3 * sec / model.config.num_image_tokens,
               times=times)
    if device is not None:
        rf = roofline(model.config, prepared["policy"], prepared["rows"], res["batch"], model.dtype, device)
        res.update(rf)
        res["achieved_fraction"] = rf["floor_s"] / sec
        res["achieved_fraction_kernel"] = rf["floor_kernel_s"] / sec
    return res


def bench_one(model: Model, batch: int, policy, *, sampling: SamplingConfig = SamplingConfig(), iters=3, warmup=1,
              device=None, seed=0, run=True, options: KernelConfig | None = None):
    """One configuration; ``run=False`` only compiles (compile time and compiled memory)."""
    prep = compile_one(model, batch, policy, sampling=sampling, seed=seed, options=options)
    if not run:
        return dict(prep["row"], s_per_call=float("nan"), images_per_s=float("nan"), ms_per_step=float("nan"),
                    times=[])
    return time_one(model, prep, iters=iters, warmup=warmup, device=device, seed=seed)


def format_rows(rows) -> str:
    w = max([9] + [len(str(r.get("name", ""))) for r in rows])  # checkpoint directory names can be long
    head = (f"{'model':>{w}} {'grid':>5} {'batch':>5} {'policy':>17} {'budget':>6} {'attn':>6} {'gemm':>6} {'seg':>3} {'compile s':>9} "
            f"{'s/call':>7} {'img/s':>8} {'ms/step':>7} {'peak GiB':>8} {'KV GiB':>7} {'floor s':>7} {'of floor':>8} "
            f"{'of k-floor':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('name', '?'):>{w}} {r.get('grid', '?'):>5} {r.get('batch', '?'):>5} "
                         f"{r.get('policy', '?'):>17}  error: {r['error'][:120]}")
            continue
        budget = "-" if r["keep"] is None else f"{r.get('budget', '')}"
        label = r["policy"] + ("/layer" if r.get("granularity") == "layer" else "") + (
            f" s={r['period']}" if (r.get("period") or 1) > 1 else "") + (
            f" inv{r['batch_invariant']}" if r.get("batch_invariant") else "")
        peak = "-" if r["peak_bytes_compiled"] is None else f"{r['peak_bytes_compiled'] / 2**30:.2f}"
        floor = r.get("floor_s", float("nan"))
        lines.append(
            f"{r.get('name', ''):>{w}} {r['grid']:>5} {r['batch']:>5} {label:>17} {budget:>6} "
            f"{r.get('attention', 'xla'):>6} {r.get('gemm', '')[:6]:>6} {r['segments']:>3} "
            f"{r['compile_s']:>9.1f} {r['s_per_call']:>7.3f} {r['images_per_s']:>8.2f} {r['ms_per_step']:>7.2f} "
            f"{peak:>8} {r['kv_bytes'] / 2**30:>7.3f} {floor:>7.3f} {r.get('achieved_fraction', float('nan')):>8.2f} "
            f"{r.get('achieved_fraction_kernel', float('nan')):>10.2f}")
    return "\n".join(lines)


def selection_shares(rows) -> list[dict]:
    """The victim selection's share of a call, (adsa-evict - window) / adsa-evict, for every
    adsa-evict row with a window row of the same model, grid, batch, budget, dtype and paths: the
    two keep the same cache (condition, prefix, ring, pool) and differ only in scoring and
    evicting, so their difference is what the selection costs (issue 5's "share of a step")."""
    def key(r):
        return tuple(r.get(k) for k in ("name", "source", "grid", "batch", "budget", "dtype", "attention", "gemm",
                                        "segments", "cfg"))

    def plain(r):  # the share is defined for head granularity at period 1 (the window's own layout)
        return r.get("granularity") in (None, "head") and (r.get("period") or 1) == 1

    ok = [r for r in rows if "error" not in r and r.get("s_per_call", 0) > 0]
    window = {key(r): r for r in ok if r["policy"] == "window"}
    out = []
    for r in ok:
        w = window.get(key(r)) if r["policy"] == "adsa-evict" and plain(r) else None
        if w is not None:
            out.append({"name": r.get("name"), "image_size": r.get("image_size"), "grid": r["grid"],
                        "batch": r["batch"], "budget": r.get("budget"),
                        "adsa_evict_s": r["s_per_call"], "window_s": w["s_per_call"],
                        "share": (r["s_per_call"] - w["s_per_call"]) / r["s_per_call"]})
    return out


def format_shares(shares) -> str:
    def where(s):
        return f"{s['image_size']} px" if s["image_size"] else f"{s['grid']}x{s['grid']} tokens"

    return "\n".join(f"selection share, {s['name']} {where(s)} batch {s['batch']} budget {s['budget']}: "
                     f"{100 * s['share']:.1f}% (adsa-evict {s['adsa_evict_s']:.3f} s, window {s['window_s']:.3f} s)"
                     for s in shares)


def compiled_in_order(model: Model, items, workers: int = 1, compile=None):
    """Compile configurations ``workers`` at a time (threads); yield ``(item, prepared)`` in item
    order (``prepared``: :func:`compile_one`'s dict, or the exception it raised). Items are dicts
    with ``batch``, ``policy`` (an object) and optional ``options`` (a KernelConfig) and ``sampling``
    (a SamplingConfig). Nothing compiles while the caller times a yielded item
    (:func:`time_one`): the next group starts only when the caller asks for it, since a compile
    on the host slows the launch-bound small batches being timed (0.31 s calls were measured at up
    to 0.77 s beside one). compile: a stand-in for :func:`compile_one`, same signature (tests)."""
    from concurrent.futures import ThreadPoolExecutor

    compile = compile_one if compile is None else compile

    def prep(item):
        try:
            return compile(model, item["batch"], item["policy"], options=item.get("options"),
                           sampling=item.get("sampling", SamplingConfig()))
        except Exception as e:  # noqa: BLE001 - one failing configuration should not end the sweep
            return e

    workers = max(1, workers)
    for start in range(0, len(items), workers):
        group = items[start:start + workers]
        with ThreadPoolExecutor(workers) as pool:  # every compile of the group ends here
            done = list(pool.map(prep, group))
        yield from zip(group, done)
        done = None  # the group's executables go once timed


def error_row(e: Exception, model: Model, item) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:400], "grid": model.config.grid, "batch": item["batch"],
            "policy": item["policy"].name}


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One model of a sweep, resolved before anything is timed (a bad file fails at once, not
    after the device measurement); its weights are made or loaded by :meth:`build`."""

    name: str  # row label: the named size, the JSON file's stem or the checkpoint directory's name
    config: GPTConfig
    image_size: int | None  # None: not known (a JSON config, or a checkpoint converted without one)
    source: str | None = None  # the JSON file or checkpoint directory; None for a named size
    checkpoint: bool = False  # weights from `source` instead of random ones

    def build(self, dtype) -> Model:
        if self.checkpoint:
            return load(self.source, dtype=dtype)
        return Model(self.config, init_params(self.config, jax.random.key(0), jnp.dtype(dtype)))


def bench_models(models=None, image_sizes=None, *, checkpoint=None, model_type=None) -> list[BenchModel]:
    """What a sweep benchmarks.

    models: named sizes (GPT-B ... GPT-7B, at each of ``image_sizes``, default 256) and JSON files
    of LlamaGen ``ModelArgs`` fields (at their own ``block_size`` unless ``image_sizes`` are
    given), both with random weights; default GPT-B. checkpoint: a converted GPT directory
    (``adsa-jax convert gpt``), run with its weights at the grid it was converted for; it replaces
    ``models`` (giving both is an error), and ``image_sizes``, if given, must be its own.
    model_type: 'c2i' or 't2i' for named sizes and JSON files that do not set it (default c2i);
    one that contradicts a JSON file or the checkpoint is an error."""
    models = [str(m).strip() for m in (models or ()) if str(m).strip()]
    sizes = list(dict.fromkeys(int(s) for s in image_sizes)) if image_sizes else None
    if checkpoint is not None:
        if models:
            raise ConfigError(f"give either models (named sizes or JSON configs, random weights) or a checkpoint, "
                              f"not both: the checkpoint {checkpoint} sets the model ({', '.join(models)} given)")
        return [_checkpoint_model(Path(checkpoint), sizes, model_type)]
    out = []
    for m in models or ["GPT-B"]:
        from_file = is_config_file(m)
        for size in sizes or ([None] if from_file else [256]):
            cfg = config_from_arg(m, image_size=size, model_type=model_type or "c2i")
            if model_type is not None and cfg.model_type != model_type:
                raise ConfigError(f"{m} is a {cfg.model_type} model config, but model type {model_type} was asked for")
            out.append(BenchModel(Path(m).stem if from_file else m, cfg, size, m if from_file else None))
    return out


def _checkpoint_model(path: Path, sizes, model_type) -> BenchModel:
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory not found: {path}")
    meta = read_meta(path)
    if meta.get("kind") != "gpt":
        raise ConfigError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a GPT")
    cfg = GPTConfig.from_dict(meta["config"])
    stored = meta.get("image_size")  # None when converted from a JSON config without --image-size
    g = cfg.grid
    for size in sizes or ():
        # The grid is not in any weight but the model was trained at it: another size is another model.
        if (size != stored) if stored else (grid_for_image_size(size) != g):
            raise ConfigError(f"{path} was converted for a {g}x{g} token grid"
                              f"{f' (image size {stored})' if stored else ''}; it cannot run at image size {size}: "
                              "leave the image size out to use the checkpoint's own")
    if model_type is not None and model_type != cfg.model_type:
        raise ConfigError(f"{path} holds a {cfg.model_type} model, but model type {model_type} was asked for")
    return BenchModel(path.resolve().name, cfg, stored or (sizes[0] if sizes else None), str(path), checkpoint=True)


SCORED = ("adsa-evict", "adsa-evict-all", "adsa-select", "h2o")  # the policies whose granularity changes the program


def policy_items(cfg: GPTConfig, policies, budgets, granularities=("head",), periods=(1,)) -> list[dict]:
    """[{"policy", "budget", "granularity", "period"}] for every policy x budget, x granularity for
    the scored policies (the others have none: None) and x period for those that take one (the
    others: 1). A bad name, budget, granularity or period raises ConfigError here, before any work."""
    out = []
    for name in policies:
        for budget in [None] if name == "dense" else budgets:
            for gran in granularities if name in SCORED else [None]:
                for period in periods if name in PERIOD_POLICIES else [1]:
                    pol = make_policy(cfg, name, budget=budget, granularity=gran or "head", period=period)
                    out.append({"policy": pol, "budget": budget, "granularity": gran, "period": period})
    for g in granularities:  # checked even where no policy uses them
        check_granularity(g)
    for s in periods:
        check_period(s)
    return out


def check_run_args(*, batches=(1,), iters=1, warmup=0, compile_workers=1, json_path=None) -> None:
    """Raise ConfigError naming the bad argument (and its flag) before a sweep measures or compiles:
    a batch or count out of range, or a --json path whose folder is missing (found after the timing
    otherwise, and the rows lost)."""
    for b in batches:
        check_count(b, "batches")
    check_count(iters, "iters")
    check_count(warmup, "warmup", minimum=0)
    check_count(compile_workers, "compile_workers")
    check_output_file(json_path, flag="--json")


def run(models=None, image_sizes=None, batches=(1, 8), policies=("dense",), budgets=(0.5,),
        dtype="bfloat16", iters=3, sampling: SamplingConfig = SamplingConfig(), json_path=None, measure=True, log=print,
        compile_workers=1, warmup=1, checkpoint=None, model_type=None, options: KernelConfig | None = None,
        granularities=("head",), periods=(1,)):
    """Sweep models x image sizes x policies x budgets (x granularities, x periods: :func:`policy_items`)
    x batches (models, image sizes, checkpoint
    and model type: :func:`bench_models`). With ``compile_workers`` > 1 the configurations of one
    model compile that many at a time in parallel threads (their compile times then overlap:
    compile_s is wall time under contention), and are timed one after another once compiled.
    Rows carry the model's ``name`` and ``source`` (the JSON file or checkpoint directory).
    options: the KernelConfig every configuration resolves (default ``KernelConfig()``)."""
    check_run_args(batches=batches, iters=iters, warmup=warmup, compile_workers=compile_workers, json_path=json_path)
    specs = bench_models(models, image_sizes, checkpoint=checkpoint, model_type=model_type)

    def items_for(cfg):
        return [dict(it, batch=b, options=options, sampling=sampling)
                for it in policy_items(cfg, policies, budgets, granularities, periods) for b in batches]

    for spec in specs:  # a bad policy or budget fails now, not after the device measurement
        items_for(spec.config)
    device = measure_device() if measure else None
    if device:
        log(f"device {device['device']}: copy {device['bandwidth'] / 1e12:.2f} TB/s, "
            f"bf16 matmul {device['matmul_flops'] / 1e12:.0f} TFLOP/s")
    rows = []
    for spec in specs:
        model = spec.build(dtype)
        items = items_for(model.config)
        log(f"{spec.name}: {len(items)} configuration(s), each compiled ({compile_workers} at a time) then timed ...")
        for item, prepared in compiled_in_order(model, items, compile_workers):
            try:
                if isinstance(prepared, Exception):
                    raise prepared
                r = time_one(model, prepared, iters=iters, warmup=warmup, device=device)
            except Exception as e:  # noqa: BLE001 - e.g. an OOM at one size
                r = error_row(e, model, item)
            prepared = None  # free the executable
            r.update(name=spec.name, source=spec.source, image_size=spec.image_size, budget=item["budget"],
                     granularity=item["granularity"], period=item["period"])
            rows.append(r)
            log(format_rows([r]).splitlines()[-1])
            if json_path:
                with open(json_path, "w") as f:
                    json.dump({"device": device or device_name(), "date": datetime.date.today().isoformat(),
                               "jax": jax.__version__, "compile_workers": compile_workers,
                               "rows": rows, "selection_shares": selection_shares(rows)}, f, indent=1)
        del model
    return device, rows


# ----------------------------------------------------------------------------- memory cap

GIB = 2**30


def device_memory_limit(device=None) -> int | None:
    """Bytes the device's allocator may hand out (``memory_stats()['bytes_limit']``; on GPU
    XLA_PYTHON_CLIENT_MEM_FRACTION of the memory), or None where the backend reports none (CPU)."""
    stats = (device or jax.devices()[0]).memory_stats()
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def resolve_memory_caps(caps, device=None) -> list[tuple[float, int]]:
    """``(GiB as reported, bytes)`` for each cap: a number of GiB, or 'device' (all the device's
    allocator may use, :func:`device_memory_limit`); the same cap twice is refused."""
    caps, out = list(caps), []
    for c in caps:
        if isinstance(c, str) and c.strip().lower() == "device":
            limit = device_memory_limit(device)
            if limit is None:
                raise ConfigError("memory cap 'device': this backend reports no memory limit (memory_stats); "
                                  "give the cap in GiB, e.g. 40")
            out.append((round(limit / GIB, 2), limit))
            continue
        try:
            gib = float(c)
        except (TypeError, ValueError):
            raise ConfigError(f"memory cap must be a number of GiB or 'device', got {c!r}") from None
        if not (gib > 0 and np.isfinite(gib)):
            raise ConfigError(f"memory cap must be a positive number of GiB, got {c!r}")
        out.append((gib, int(gib * GIB)))
    if not out:
        raise ConfigError("no memory cap given (GiB, or 'device')")
    seen = {}
    for c, (gib, limit) in zip(caps, out):  # the same search twice: '40,40.0', or 'device' of 40 GiB
        if limit in seen:
            raise ConfigError(f"memory caps {seen[limit]!r} and {c!r} are the same cap ({gib:g} GiB): give each cap once")
        seen[limit] = c
    return out


@dataclasses.dataclass
class BatchSearch:
    """The largest batch (a multiple of ``align``, at most ``max_batch``) whose compiled peak memory
    is at most ``cap`` bytes, from peaks measured one candidate batch at a time.

    ``known`` maps batch -> compiled peak bytes (``inf``: ran out of memory when run); it is shared
    by the searches of one configuration under several caps, since the peak does not depend on the
    cap. The search doubles from ``start`` (two batches at once), then steps to where the line
    through its two largest fitting peaks meets the cap, then narrows the bracket [largest fitting,
    smallest over] by interpolating between its ends (candidates in pairs, b and b + align, so an
    affine peak ends it in one round), halving it too once a round has left it open (a peak that
    is not affine in the batch). Every candidate is compiled before anything runs: a batch over the
    cap is never run."""

    cap: int
    start: int = 8
    align: int = 1
    max_batch: int = 4096
    bracketed_rounds: int = 0

    def __post_init__(self):
        for name, flag in (("start", ""), ("align", " (--batch-step)"), ("max_batch", " (--max-batch)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"batch search: {name}{flag} must be an integer >= 1, got {v!r}")
        if self.max_batch < self.align:
            raise ConfigError(f"batch search: max batch {self.max_batch} is below the batch step {self.align}")

    def _down(self, b: float) -> int:
        return int(b // self.align) * self.align

    def bracket(self, known) -> tuple[int, int | None]:
        """(largest fitting batch or 0, smallest batch above it that does not fit or None)."""
        lo = max((b for b, p in known.items() if p <= self.cap), default=0)
        hi = min((b for b, p in known.items() if p > self.cap and b > lo), default=None)
        return lo, hi

    def done(self, known) -> bool:
        lo, hi = self.bracket(known)
        return (hi is not None and hi - lo <= self.align) or (hi is None and lo >= self._down(self.max_batch))

    def candidates(self, known) -> list[int]:
        """The batches to compile next (none known yet); [] when the search is over."""
        if self.done(known):
            return []
        lo, hi = self.bracket(known)
        top = self._down(self.max_batch)
        if hi is None:
            fits = sorted(b for b, p in known.items() if p <= self.cap)
            if not fits:  # nothing measured yet
                s = max(self.align, self._down(self.start) or self.align)
                want = [s, 2 * s]
            elif len(fits) == 1:
                want = [2 * lo, 4 * lo]
            else:
                (b1, p1), (b2, p2) = [(b, known[b]) for b in fits[-2:]]
                slope = (p2 - p1) / (b2 - b1)
                guess = self._down(b2 + (self.cap - p2) / slope) if slope > 0 else 2 * b2
                guess = max(guess, lo + self.align)
                want = [guess, guess + self.align]
            want = [min(self._down(b), top) for b in want]
        else:
            self.bracketed_rounds += 1
            p_lo, p_hi = (known[lo] if lo else None), known[hi]
            mid = self._down((lo + hi) // 2)
            if lo == 0:
                want = [max(self.align, self._down(hi // 2))]
            elif not np.isfinite(p_hi) or p_hi <= p_lo:
                want = [mid]
            else:
                guess = self._down(lo + (self.cap - p_lo) * (hi - lo) / (p_hi - p_lo))
                # the last round did not close it (peak not affine in batch): halve the bracket too
                want = [guess, guess + self.align] + ([mid] if self.bracketed_rounds > 1 else [])
            want = [min(max(b, lo + self.align), hi - self.align) for b in want]
        return sorted({b for b in want if b not in known and b >= self.align})

    def summary(self, known) -> dict:
        lo, hi = self.bracket(known)
        return {"largest_fitting": lo, "smallest_over": hi,
                "max_batch_reached": hi is None and lo >= self._down(self.max_batch),
                "compiled": {str(b): (int(p) if np.isfinite(p) else None) for b, p in sorted(known.items())}}


def peak_hint_key(name: str, image_size: int, item: dict) -> str:
    """The key of one configuration in a peak-hints file: MODEL:PX:POLICY:BUDGET:GRANULARITY:PERIOD."""
    return f"{name}:{image_size}:{item['policy'].name}:{item['budget']}:{item['granularity']}:{item['period']}"


def load_peak_hints(path) -> dict:
    """{key (:func:`peak_hint_key`): {batch: compiled peak bytes}} from a JSON file whose ``peaks``
    maps each key to {batch: bytes} (``benchmarks/cap_peaks.py`` writes one). A missing or malformed
    file is a ConfigError naming it."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise ConfigError(f"--peak-hints {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"--peak-hints {path}: not JSON ({e})") from None
    peaks = doc.get("peaks") if isinstance(doc, dict) else None
    if not isinstance(peaks, dict):
        raise ConfigError(f"--peak-hints {path}: expected an object with 'peaks': {{key: {{batch: bytes}}}}")
    out = {}
    for key, table in peaks.items():
        try:
            out[str(key)] = {int(b): int(p) for b, p in table.items()}
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"--peak-hints {path}: peaks[{key!r}] must map batches to bytes (integers)") from None
        if any(b < 1 or p < 0 for b, p in out[str(key)].items()):
            raise ConfigError(f"--peak-hints {path}: peaks[{key!r}] has a batch below 1 or negative bytes")
    return out


def _is_oom(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _peak_in_use(device) -> int | None:
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def cap_search(model: Model, items, caps, *, start=8, align=1, max_batch=4096, workers=1, iters=3, warmup=1,
               device=None, compile=None, log=print, hints=None):
    """For each item (a configuration without a batch: ``policy``, optional ``options`` and
    ``sampling``) and each cap ``(GiB, bytes)``: the largest batch whose compiled peak fits the cap
    (:class:`BatchSearch`), timed (:func:`time_one`). The searches of all items and caps advance
    together, each round's candidates compiled ``workers`` at a time (:func:`compiled_in_order`);
    nothing runs until every search is over. The chosen batches then run in order of their
    compiled peak; one that runs out of memory on the device counts as not fitting and its search
    goes on. Yields ``(item index, cap, row)``, each as soon as its batch is timed (so a caller that
    saves rows as they come keeps what a run cut short measured), the errors last; the row has
    ``memory_cap_gib``, ``cap_bytes``, ``search`` (:meth:`BatchSearch.summary`) and, where the
    device reports it, ``peak_bytes_run``:
    the device's peak bytes in use during the timed calls (None when an earlier call had set a
    higher peak, which the runtime cannot reset). An item whose compile fails, or for which no batch
    fits, yields a row with ``error``. compile: a stand-in for :func:`compile_one` (tests).
    hints: None, or per item None or {batch: compiled peak bytes} from an earlier compile for this
    device (:func:`load_peak_hints`): the search starts from them as if compiled, so it needs no
    compile where they bracket a cap; a hinted batch compiled to be run takes its own peak, and
    the search goes on if that no longer fits. The row's ``search`` lists the batches still hinted."""
    dev = jax.devices()[0]
    hints = list(hints or [None] * len(items))
    known = [dict(h or {}) for h in hints]  # per item: batch -> compiled peak bytes
    hinted = [set(h or ()) for h in hints]  # per item: batches whose peak is a hint, not compiled here
    keep = [dict() for _ in items]  # per item: batch -> prepared executable, for batches that fit a cap
    failed = {}  # item index -> error text
    searches = {(i, cap): BatchSearch(cap[1], start=start, align=align, max_batch=max_batch)
                for i in range(len(items)) for cap in caps}
    timed = {}  # (item index, batch) -> row
    done = set()  # (item index, cap) already yielded

    def answer(i, cap):
        lo, _ = searches[i, cap].bracket(known[i])
        base = {"memory_cap_gib": cap[0], "cap_bytes": cap[1],
                "search": {**searches[i, cap].summary(known[i]), "hinted": sorted(hinted[i])}}
        if i in failed:
            row = {"error": failed[i], "policy": items[i]["policy"].name, "batch": None}
        elif lo == 0:
            smallest = min(known[i], default=None)
            need = f"batch {smallest} needs {known[i][smallest] / GIB:.2f} GiB compiled" if smallest else "nothing fits"
            row = {"error": f"no batch fits {cap[0]:g} GiB: {need}", "policy": items[i]["policy"].name, "batch": None}
        else:
            row = dict(timed[i, lo])
        row.update(base)
        return i, cap, row

    while True:
        want = [(i, b) for (i, cap), s in searches.items() if i not in failed for b in s.candidates(known[i])]
        # a search reopened by an out-of-memory run can end on a batch whose executable went: again
        want += [(i, s.bracket(known[i])[0]) for (i, cap), s in searches.items() if i not in failed
                 and s.done(known[i]) and s.bracket(known[i])[0] not in keep[i] and s.bracket(known[i])[0] > 0]
        want = list(dict.fromkeys(want))
        if want:
            group = [dict(items[i], batch=b, _index=i) for i, b in want]
            for item, prepared in compiled_in_order(model, group, workers, compile):
                i, b = item["_index"], item["batch"]
                if isinstance(prepared, Exception):
                    failed[i] = f"batch {b}: {type(prepared).__name__}: {prepared}"[:400]
                    continue
                peak = prepared["row"]["peak_bytes_compiled"]
                if b in known[i] and b not in hinted[i]:  # compiled again to be run (its peak is known)
                    keep[i][b] = prepared
                    continue
                if peak is None:
                    raise ConfigError("this backend reports no compiled memory (memory_analysis); a memory cap "
                                      "needs it")
                note = f" (hint {known[i][b] / GIB:.3f})" if b in hinted[i] else ""
                hinted[i].discard(b)
                known[i][b] = peak
                log(f"  {items[i]['policy'].name} batch {b}: compiled peak {peak / GIB:.3f} GiB{note}")
                if any(peak <= cap[1] for cap in caps):
                    keep[i][b] = prepared
                prepared = None
            for i in range(len(items)):  # executables no search can still choose go
                los = {s.bracket(known[i])[0] for (j, _), s in searches.items() if j == i}
                keep[i] = {b: p for b, p in keep[i].items() if b in los}
            continue
        # every search is over: run the chosen batches, smallest compiled peak first
        chosen = sorted({(i, searches[i, cap].bracket(known[i])[0]) for (i, cap) in searches if i not in failed},
                        key=lambda ib: known[ib[0]].get(ib[1], 0))
        oom = False
        for i, b in chosen:
            if b == 0 or (i, b) in timed:
                continue
            log(f"  {items[i]['policy'].name} batch {b}: timing {warmup} warm-up and {iters} timed call(s) ...")
            before = _peak_in_use(dev)
            try:
                r = time_one(model, keep[i][b], iters=iters, warmup=warmup, device=device)
            except Exception as e:  # noqa: BLE001 - a runtime out-of-memory is "does not fit"
                if not _is_oom(e):
                    failed[i] = f"batch {b}: {type(e).__name__}: {e}"[:400]
                    continue
                log(f"  {items[i]['policy'].name} batch {b}: out of memory when run; searching below it")
                known[i][b] = float("inf")
                keep[i].pop(b, None)
                oom = True
                break
            after = _peak_in_use(dev)
            r["peak_bytes_run"] = after if after is not None and before is not None and after > before else None
            timed[i, b] = r
            # each cap's answer goes out as soon as its batch is timed, so a run cut short keeps it: a later
            # out-of-memory run only ever reopens searches whose batch has not run
            for key in [k for k in searches if k[0] == i and k not in done and searches[k].bracket(known[i])[0] == b]:
                done.add(key)
                yield answer(*key)
        if not oom:
            break
    for key in searches:
        if key not in done:
            yield answer(*key)


def format_cap_rows(rows) -> str:
    """The rows of :func:`run_memory_cap` as a table: per cap and policy, the largest batch, its speed
    and memory."""
    w = max([9] + [len(str(r.get("name", ""))) for r in rows])
    head = (f"{'model':>{w}} {'grid':>5} {'cap GiB':>8} {'policy':>17} {'budget':>6} {'batch':>6} {'img/s':>8} "
            f"{'s/call':>7} {'peak GiB':>8} {'run GiB':>8} {'KV GiB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = "-" if r.get("budget") is None else f"{r['budget']}"
        label = r["policy"] + ("/layer" if r.get("granularity") == "layer" else "") + (
            f" s={r['period']}" if (r.get("period") or 1) > 1 else "")
        lead = (f"{r.get('name', ''):>{w}} {r.get('grid', '?'):>5} {r['memory_cap_gib']:>8g} {label:>17} "
                f"{budget:>6}")
        if "error" in r:
            lines.append(f"{lead}  error: {r['error'][:120]}")
            continue
        run_peak = "-" if r.get("peak_bytes_run") is None else f"{r['peak_bytes_run'] / GIB:.2f}"
        more = " (max batch)" if r["search"]["max_batch_reached"] else ""
        lines.append(f"{lead} {r['batch']:>6} {r['images_per_s']:>8.2f} {r['s_per_call']:>7.3f} "
                     f"{r['peak_bytes_compiled'] / GIB:>8.2f} {run_peak:>8} {r['kv_bytes'] / GIB:>7.3f}{more}")
    return "\n".join(lines)


def run_memory_cap(models=None, image_sizes=None, policies=("dense",), budgets=(0.5,), caps=(40.0,),
                   dtype="bfloat16", iters=3, warmup=1, sampling: SamplingConfig = SamplingConfig(), json_path=None,
                   measure=True, log=print, compile_workers=1, checkpoint=None, model_type=None,
                   options: KernelConfig | None = None, start=8, align=1, max_batch=4096, granularities=("head",),
                   periods=(1,), peak_hints=None):
    """Throughput at equal memory: for each model x policy x budget x cap (GiB or 'device'), the
    largest batch that fits the cap (:func:`cap_search`) and its speed. Models, image sizes,
    checkpoint and model type as :func:`run`; rows as :func:`run`'s plus ``memory_cap_gib``.
    peak_hints: None, or a file (:func:`load_peak_hints`) whose compiled peaks start each search."""
    check_run_args(iters=iters, warmup=warmup, compile_workers=compile_workers, json_path=json_path)
    specs = bench_models(models, image_sizes, checkpoint=checkpoint, model_type=model_type)
    hints = load_peak_hints(peak_hints) if peak_hints is not None else {}

    def items_for(cfg):
        return [dict(it, options=options, sampling=sampling)
                for it in policy_items(cfg, policies, budgets, granularities, periods)]

    for spec in specs:  # bad policies, budgets, caps and search bounds fail now, before any timing
        items_for(spec.config)
    resolved = resolve_memory_caps(caps)
    BatchSearch(1, start=start, align=align, max_batch=max_batch)
    device = measure_device() if measure else None
    if device:
        log(f"device {device['device']}: copy {device['bandwidth'] / 1e12:.2f} TB/s, "
            f"bf16 matmul {device['matmul_flops'] / 1e12:.0f} TFLOP/s")
    log("memory caps: " + ", ".join(f"{g:g} GiB" for g, _ in resolved))
    rows = []
    for spec in specs:
        model = spec.build(dtype)
        items = items_for(model.config)
        found = [hints.get(peak_hint_key(spec.name, spec.image_size, it)) for it in items]
        if hints:
            log(f"{spec.name} {spec.image_size} px: peak hints for {sum(h is not None for h in found)} of "
                f"{len(items)} configurations")
        for i, cap, r in cap_search(model, items, resolved, start=start, align=align, max_batch=max_batch,
                                    workers=compile_workers, iters=iters, warmup=warmup, device=device, log=log,
                                    hints=found):
            r.update(name=spec.name, source=spec.source, image_size=spec.image_size, budget=items[i]["budget"],
                     granularity=items[i]["granularity"], period=items[i]["period"])
            if "error" in r:
                r.setdefault("grid", model.config.grid)
            rows.append(r)
            log(format_cap_rows([r]).splitlines()[-1])
            if json_path:
                with open(json_path, "w") as f:
                    json.dump({"device": device or device_name(), "date": datetime.date.today().isoformat(),
                               "jax": jax.__version__, "memory_caps_gib": [g for g, _ in resolved],
                               "rows": rows}, f, indent=1)
        del model
    return device, rows
