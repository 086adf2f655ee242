"""One layer's decode through a policy on fixed random inputs (no model: a small compile per policy)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def layer_decode(policy, rows=3, heads=2, head_dim=8, repeat=None):
    """(outputs (N-1, B, H, D), final cache positions or None (dense)) of one layer's decode for
    fixed random condition and q, k, v; each step gets per-row keys (the random policies).
    repeat: step t's v is step t % repeat's (identical V vectors: exact ties in the scores)."""
    c, N = policy.c, policy.n
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(N - 1, rows, heads, head_dim)), jnp.float32) for _ in range(3))
    if repeat:
        v = v[jnp.arange(N - 1) % repeat]
    kc, vc = (jnp.asarray(rng.normal(size=(rows, c, heads, head_dim)), jnp.float32) for _ in range(2))
    ex_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(rows))

    @jax.jit
    def run():
        cache = policy.prefill(policy.init(rows, heads, head_dim, jnp.float32), kc, vc)

        def body(cache, t):
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, t + 1))(ex_keys)
            return policy.decode(cache, q[t], k[t], v[t], t, jnp.ones((rows, c), bool), layer_index=0, row_keys=keys)
        cache, out = jax.lax.scan(body, cache, jnp.arange(N - 1))
        return out, cache.get("pos")

    out, pos = run()
    return np.asarray(out), None if pos is None else np.asarray(pos)
