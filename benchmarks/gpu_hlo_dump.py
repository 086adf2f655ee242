"""Diagnostics: compile a config, dump its optimised HLO and a kernel-time profile to $OUT."""
import collections, glob, gzip, json, os, sys
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
from adsa_jax.config import named_config
from adsa_jax.generate import Model, _generate_jit, _scalars
from adsa_jax.model import init_params
from adsa_jax.cache import make_policy

OUT = os.environ.get("OUT", "/tmp/out")
cfg = named_config(sys.argv[1], image_size=int(sys.argv[2]))
m = Model(cfg, init_params(cfg, jax.random.key(0), jnp.bfloat16))
for spec in sys.argv[3:]:
    pol_name, batch, seg = spec.split(":")
    batch, seg = int(batch), int(seg)
    pol = make_policy(cfg, pol_name, budget=None if pol_name == "dense" else 0.5)
    args = (m.params, jnp.arange(batch, dtype=jnp.int32), jnp.ones((batch, 1), bool), jax.random.key(0),
            jnp.arange(batch, dtype=jnp.int32), _scalars(4.0, -1, 1.0, 2000, 1.0))
    kw = dict(cfg=cfg, policy=pol, use_cfg=True, num_segments=seg)
    comp = _generate_jit.lower(*args, **kw).compile()
    with gzip.open(f"{OUT}/hlo_{pol_name}_{batch}.txt.gz", "wt") as f:
        f.write(comp.as_text())
    comp(*args).block_until_ready()
    d = f"/tmp/trace_{pol_name}"
    with jax.profiler.trace(d, create_perfetto_trace=True):
        comp(*args).block_until_ready()
    tr = json.load(gzip.open(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]))
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    pids = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    agg, cnt = collections.Counter(), collections.Counter()
    for e in ev:
        if e.get("ph") == "X" and "dur" in e and "/device:GPU" in pids.get(e.get("pid"), ""):
            agg[e["name"]] += e["dur"]; cnt[e["name"]] += 1
    json.dump({"agg": agg, "cnt": cnt}, open(f"{OUT}/prof_{pol_name}_{batch}.json", "w"))
    print(pol_name, batch, "busy ms", sum(agg.values()) / 1e3, flush=True)
    for n, t in agg.most_common(12):
        print(f"  {t/1e3:9.2f} ms {cnt[n]:7d}x  {n[:70]}")
