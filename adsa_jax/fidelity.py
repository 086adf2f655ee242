"""What a policy costs and saves: KV bytes, attended tokens, and fidelity to dense along one
teacher-forced trajectory (per-step KL of the next-token distribution, top-1 agreement)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError
from .generate import Model, generate, score
from .options import SamplingConfig
from .cache import kv_bytes, make_policy


def kl_and_agreement(ref_logits, logits):
    """Per-step KL(ref || policy) averaged over the batch (N,), and top-1 agreement (N,)."""
    lp = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    lq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)  # (B, N)
    agree = jnp.argmax(lp, -1) == jnp.argmax(lq, -1)
    return np.asarray(kl.mean(0)), np.asarray(agree.mean(0))


def compare_policies(model: Model, labels, *, tokens=None, policies=("dense", "adsa-evict"), budgets=(0.5,),
                     key=None, prefix=None, local=None, granularity="head", sampling: SamplingConfig = SamplingConfig(),
                     cond_mask=None, log=None):
    """Rows of {policy, budget, sizes, kv bytes, attended, kl_mean, kl_max, top1} along one trajectory.

    tokens: (B, N) to score; None samples them with dense generation (seeded by ``key``) under
    ``sampling``, whose guidance (cfg_scale, cfg_interval) the scoring uses too. log: a function
    of one progress line (default: silent)."""
    log = log or (lambda msg: None)
    cfg = model.config
    clock = time.perf_counter()
    if tokens is None:
        key = jax.random.key(0) if key is None else key
        log(f"sampling the dense trajectory of {len(labels)} images (compiling first) ...")
        tokens = generate(model, labels, key, cond_mask=cond_mask, sampling=sampling)
    tokens = np.asarray(tokens)
    rows_per_image = 2 if sampling.guided else 1
    dense_pol = make_policy(cfg, "dense")
    ref = score(model, labels, tokens, cond_mask=cond_mask, policy=dense_pol, sampling=sampling)
    dense_bytes = kv_bytes(dense_pol, cfg, rows_per_image, model.dtype)
    n = cfg.num_image_tokens
    out = []
    for name in policies:
        for budget in ([None] if name == "dense" else budgets):
            try:
                pol = make_policy(cfg, name, budget=budget, prefix=prefix, local=local, granularity=granularity) \
                    if name != "dense" else dense_pol
            except ConfigError as e:
                out.append({"policy": name, "budget": budget, "error": str(e)})
                continue
            logits = ref if name == "dense" else score(model, labels, tokens, cond_mask=cond_mask, policy=pol,
                                                       sampling=sampling)
            log(f"scored {name}" + ("" if budget is None else f" budget {budget:g}") +
                f" ({time.perf_counter() - clock:.1f} s elapsed)")
            kl, agree = kl_and_agreement(ref, logits)
            b = kv_bytes(pol, cfg, rows_per_image, model.dtype)
            attended = float(np.mean([pol.attended(t) for t in range(n)]))
            out.append({
                "policy": name, "budget": budget,
                "prefix": getattr(pol, "prefix", None), "keep": getattr(pol, "keep", None),
                "local": getattr(pol, "local", None), "granularity": getattr(pol, "granularity", None),
                "kv_bytes_per_image": int(b), "kv_vs_dense": b / dense_bytes,
                "attended_per_step": attended,
                "kl_mean": float(kl.mean()), "kl_max_step": float(kl.max()), "top1_agreement": float(agree.mean()),
            })
    return out


def format_table(rows) -> str:
    head = f"{'policy':<12} {'budget':>6} {'P/K/M':>11} {'KV/image':>10} {'vs dense':>8} {'attended':>8} " \
           f"{'KL mean':>9} {'KL worst':>9} {'top-1':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['policy']:<12} {r['budget']!s:>6}  error: {r['error']}")
            continue
        sizes = "-" if r["prefix"] is None else f"{r['prefix']}/{r['keep']}/{r['local']}"
        b = r["budget"] if r["budget"] is not None else 1.0
        kv = r["kv_bytes_per_image"]
        kv_s = f"{kv / 2**20:.2f}MiB" if kv >= 2**20 else f"{kv / 2**10:.1f}KiB"
        lines.append(f"{r['policy']:<12} {b:>6.2f} {sizes:>11} {kv_s:>10} {r['kv_vs_dense']:>8.3f} "
                     f"{r['attended_per_step']:>8.1f} {r['kl_mean']:>9.4f} {r['kl_max_step']:>9.4f} "
                     f"{r['top1_agreement']:>6.3f}")
    return "\n".join(lines)
