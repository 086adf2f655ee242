"""The fidelity lab's training step on one GPU: ms per step chunk after chunk (does it grow?), and
where a chunk's time goes (GPU kernels by name; kernel-busy time against wall time), early and late.

    python benchmarks/lab_train_step_time.py --data-dir .labdata --chunks 12 --json lab_step.json
    python benchmarks/lab_train_step_time.py --data-dir .labdata --no-donate --json lab_step_nodonate.json

The model, optimizer and batches are the lab's own (examples/fidelity/train.py); without --data-dir
the tokens are random, of the lab's shape (576 tokens, 1,024 codes).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "fidelity"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as lab  # noqa: E402
from gpu_trace import gpu_kernel_times  # noqa: E402

from adsa_jax import model as M  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="the lab's data (tokens.npz); default: random tokens")
    p.add_argument("--seeds", type=int, default=3, help="models side by side (default %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="sequences per step and seed (default %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="model width (default %(default)s)")
    p.add_argument("--layers", type=int, default=12, help="layers (default %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="heads (default %(default)s)")
    p.add_argument("--chunk", type=int, default=50, help="steps per compiled chunk (default %(default)s)")
    p.add_argument("--chunks", type=int, default=12, help="chunks to time (default %(default)s)")
    p.add_argument("--no-donate", action="store_true", help="do not donate the state to each chunk")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args(argv)

    if a.data_dir is not None:
        z = np.load(a.data_dir / "tokens.npz")
        toks, labs = z["train_tokens"].astype(np.int32), z["train_labels"].astype(np.int32)
        classes = int(z["repeat_class"]) + 1
    else:
        rng = np.random.default_rng(0)
        toks, labs, classes = rng.integers(0, 1024, (16900, 576), dtype=np.int32), rng.integers(0, 100, 16900).astype(np.int32), 100
    grid = int(round(toks.shape[1] ** 0.5))
    cfg = lab.lab_config(1024, classes, grid, dim=a.dim, layers=a.layers, heads=a.heads)
    tx = lab.make_tx(0.05)
    train_chunk, _ = lab.make_steps(cfg, tx, donate=not a.no_donate)
    seeds = list(range(a.seeds))
    params = jax.jit(jax.vmap(lambda k: M.init_params(cfg, k, jnp.float32)))(jnp.stack([jax.random.key(s) for s in seeds]))
    opt = jax.jit(jax.vmap(tx.init))(params)
    tokens, labels, n = jnp.asarray(toks), jnp.asarray(labs), toks.shape[0]

    def inputs(c):
        steps = range(c * a.chunk, (c + 1) * a.chunk)
        idx = np.stack([lab.batch_indices(s, n, a.batch, steps) for s in seeds])  # (S, chunk, B)
        ks = jax.random.split(jax.random.key(c), (len(seeds), a.chunk))  # (S, chunk)
        return jnp.asarray(idx), ks, jnp.full((a.chunk,), 3e-4, jnp.float32)

    print(f"{len(seeds)} seeds x {M.count_params(cfg) / 1e6:.1f}M params, batch {a.batch}, chunks of {a.chunk}, "
          f"donate {not a.no_donate}, {jax.devices()[0].device_kind}", flush=True)
    t0 = time.time()
    params, opt, losses = train_chunk(params, opt, tokens, labels, *inputs(0))
    np.asarray(losses)
    print(f"compiled + first chunk: {time.time() - t0:.1f} s", flush=True)
    ms, traces = [], {}
    profile_at = {1, a.chunks - 1}
    for c in range(1, a.chunks):
        args = inputs(c)
        jax.block_until_ready(args)
        if c in profile_at:
            box = {}

            def run():
                box["out"] = train_chunk(params, opt, tokens, labels, *args)
                np.asarray(box["out"][2])
            t1 = time.time()
            agg, cnt, span = gpu_kernel_times(run)
            wall = time.time() - t1
            params, opt, losses = box["out"]
            busy = sum(agg.values()) / 1e6
            top = [{"kernel": k, "ms_per_step": v / 1e3 / a.chunk, "launches_per_step": cnt[k] / a.chunk}
                   for k, v in agg.most_common(15)]
            traces[c] = {"wall_s": wall, "span_s": span / 1e6, "kernel_busy_s": busy, "top": top}
            print(f"chunk {c} (profiled): wall {wall:.2f} s, GPU span {span / 1e6:.2f} s, kernels busy {busy:.2f} s", flush=True)
            for t in top[:8]:
                print(f"    {t['ms_per_step']:8.2f} ms/step  x{t['launches_per_step']:.0f}  {t['kernel']}", flush=True)
            continue
        t1 = time.time()
        params, opt, losses = train_chunk(params, opt, tokens, labels, *args)
        np.asarray(losses)
        ms.append((c, (time.time() - t1) / a.chunk * 1e3))
        print(f"chunk {c}: {ms[-1][1]:.0f} ms/step", flush=True)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": {k: str(v) for k, v in vars(a).items()},
           "ms_per_step": ms, "profiles": traces}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
