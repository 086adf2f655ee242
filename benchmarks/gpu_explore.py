"""Exploration run on the GPU: a few XL configs plus a profile of one call (kernel time by name)."""
import gzip, json, os, sys, time, glob, collections
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from adsa_jax.bench import bench_one, measure_device, format_rows
from adsa_jax.config import named_config
from adsa_jax.generate import Model, _generate_jit, _scalars
from adsa_jax.model import init_params
from adsa_jax.policies import make_policy

OUT = os.environ.get("OUT", "/tmp/out")
TAG = os.environ.get("TAG", "explore")
plan = json.loads(sys.argv[1])
dev = measure_device()
print("device", dev, "jax", jax.__version__, flush=True)
rows = []
models = {}
for item in plan:
    name, size, batch, pol, budget, seg = item["model"], item["size"], item["batch"], item["policy"], item.get("budget"), item.get("seg", 1)
    key = (name, size)
    if key not in models:
        models.clear()
        cfg = named_config(name, image_size=size)
        models[key] = Model(cfg, init_params(cfg, jax.random.key(0), jnp.bfloat16))
    m = models[key]
    p = make_policy(m.config, pol, budget=budget)
    try:
        r = bench_one(m, batch, p, segments=seg, device=dev, iters=item.get("iters", 3),
                      warmup=0 if item.get("compile_only") else 1, run=not item.get("compile_only"))
    except Exception as e:
        r = {"error": repr(e)[:300], "grid": m.config.grid, "batch": batch, "policy": pol}
    r.update(name=name, image_size=size, budget=budget)
    rows.append(r)
    print(format_rows([r]).splitlines()[-1], flush=True)
    json.dump({"device": dev, "jax": jax.__version__, "rows": rows}, open(f"{OUT}/{TAG}.json", "w"), indent=1)
    if item.get("profile"):
        cfg = m.config
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        args = (m.params, labels, jnp.ones((batch, 1), bool), jax.random.key(0), jnp.arange(batch, dtype=jnp.int32), _scalars(4.0, -1, 1.0, 2000, 1.0))
        kw = dict(cfg=cfg, policy=p, use_cfg=True, num_segments=seg if pol == "dense" else 1)
        _generate_jit(*args, **kw).block_until_ready()
        d = f"/tmp/trace_{len(rows)}"
        with jax.profiler.trace(d, create_perfetto_trace=True):
            _generate_jit(*args, **kw).block_until_ready()
        f = glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)
        if f:
            tr = json.load(gzip.open(f[0]))
            ev = tr["traceEvents"] if isinstance(tr, dict) else tr
            pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
            agg = collections.Counter(); cnt = collections.Counter()
            for e in ev:
                if e.get("ph") == "X" and "dur" in e and "gpu" in pids.get(e.get("pid"), "").lower() or (e.get("ph") == "X" and "/device:GPU" in pids.get(e.get("pid"), "")):
                    agg[e["name"][:80]] += e["dur"]; cnt[e["name"][:80]] += 1
            tot = sum(agg.values())
            print(f"profile {pol} b{batch} seg{seg}: device busy {tot/1e3:.1f} ms over {sum(cnt.values())} events; procs {set(pids.values())}")
            for n, t in agg.most_common(25):
                print(f"  {t/1e3:9.2f} ms {cnt[n]:7d}x  {n}")
