"""GPU kernel times from a profiler trace: imported by the timing scripts here, not run on its own."""
import collections
import glob
import gzip
import json
import tempfile

import jax


def gpu_kernel_times(run):
    """Call ``run()`` under ``jax.profiler.trace`` (a fresh folder: a reused one would hold an
    older trace). Returns (µs per kernel name, launches per name, span µs from the first kernel's
    start to the last one's end), GPU events only; empty on a host without a GPU trace."""
    d = tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        run()
    agg, cnt = collections.Counter(), collections.Counter()
    f = glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)
    if not f:
        return agg, cnt, 0.0
    tr = json.load(gzip.open(f[0]))
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    t0, t1 = float("inf"), 0.0
    for e in ev:
        if e.get("ph") == "X" and "dur" in e and "/device:GPU" in pids.get(e.get("pid"), ""):
            agg[e["name"][:80]] += e["dur"]
            cnt[e["name"][:80]] += 1
            t0, t1 = min(t0, e["ts"]), max(t1, e["ts"] + e["dur"])
    return agg, cnt, max(t1 - t0, 0.0)


def kernel_us_per_call(f, args, n=20):
    """µs per kernel name per call of ``f(*args)``, GPU kernels only, from ``n`` calls after one
    warm-up call (the micro-benchmarks' common measurement)."""
    jax.block_until_ready(f(*args))
    agg, _, _ = gpu_kernel_times(lambda: jax.block_until_ready([f(*args) for _ in range(n)]))
    return {k: v / n for k, v in agg.items()}
