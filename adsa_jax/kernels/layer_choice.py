"""layer_choice: adsa-evict's per-layer victims at layer granularity (period 1) for every layer of a
step, from the score terms the step kernels left in each layer's cache, in one kernel."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .common import pl, plgpu


# The XLA form (Evict._layer_choice) stacks the L layers' (B, H, S) terms and reduces them over
# heads: the stack stays a 36-way concatenate inside each fusion, and the fusion that gathers the
# four norm lanes ran one thread per output, 20 gathers through that concatenate each (GPT-XL
# 384 px batch 64 on an H200: 118 us a step; the head sums and the first maximum 201 us more).
# Here each program is one (row, layer): it reads that layer's candidate slots of every head once.
def _choice_kernel(ring_ref, rn_ref, *refs, n_layers, heads, start, K, M, width, eps, choose, big):
    sqs = refs[:n_layers]
    dots = refs[n_layers:2 * n_layers] if choose else None
    first_ref, lanes_ref = refs[-2:]
    layer = pl.program_id(1)
    # A traced start: the masked block may reach past the cache's last slot, which a static start
    # fails at trace time (interpret mode pads the read instead).
    lo = start + layer * 0
    ring, rn = ring_ref[()] - start, rn_ref[()] - start  # candidate positions: K pool slots, then the ring
    idx = jnp.arange(width)
    ok = idx < K + M
    cand = (idx < K) | (idx == ring)
    f32 = jnp.float32

    def one(i):
        # Heads summed in head order from zero, as XLA's reduction of the stacked terms over heads.
        def head_sum(refs_i):  # a loop, not unrolled: L copies of the body compile (36 unrolled: 149 s)
            def add(h, acc):
                row = plgpu.load(refs_i.at[pl.ds(h, 1), pl.ds(lo, width)], mask=ok[None, :], other=0.0)  # (1, width)
                return acc + jnp.sum(row, axis=0)
            return jax.lax.fori_loop(0, heads, add, jnp.zeros((width,), f32))

        ssq = head_sum(sqs[i])  # (width,): each candidate's layer-vector |v|^2
        if choose:  # the first maximum of v . total / max(|v|, eps) over the pool and o's ring slot
            score = jnp.where(cand, head_sum(dots[i]) / jnp.maximum(jnp.sqrt(ssq), eps), -big)
            first = jnp.min(jnp.where(score == jnp.max(score), idx, width))
        else:  # before the first choice: a placeholder victim (pool position 0)
            first = jnp.int32(0)
        ev = jnp.minimum(first, K - 1)

        def at(pos):
            return jnp.sum(jnp.where(idx == pos, ssq, 0.0))
        lane = jnp.arange(4)
        first_ref[...] = first.astype(jnp.int32)
        lanes_ref[...] = jnp.where(lane == 1, at(ev), jnp.where(lane == 2, at(rn), at(ring)))

    for i in range(n_layers):  # program (row, layer i) runs layer i's code: the L layers are L inputs
        pl.when(layer == i)(functools.partial(one, i))


def layer_choice(sq, dots, ring, ring_next, *, start: int, keep: int, local: int, eps: float, big: float,
                 num_warps: int = 4, interpret: bool = False):
    """Every layer's choice at layer granularity, period 1, from per-layer score terms (lists of L
    (B, H, S) float32 arrays: sq = v_i . v_i and dots = v_i . total per head and slot, as the step
    kernels write them), read in place (no stack of the L layers).

    Candidates are the K pool slots from ``start`` (c + P) and the ring slot ``ring``; a
    candidate's score is the head sum of dots over max(sqrt(head sum of sq), eps), and the choice
    its first maximum (0..K-1 a pool position, K or more o itself), as
    :meth:`adsa_jax.cache.evict.Evict._layer_choice` computes it in XLA. The heads are summed in
    head order from zero: the XLA form's result on a CPU bit for bit; XLA on a GPU may sum in
    another order, and a near tie may then fall to the other candidate. A NaN score (a NaN in V)
    is not chosen, where argmax would choose it. ``dots`` None: no choice (a
    placeholder 0). Returns (first (L, B, 1) int32, lanes (L, B, 4) float32): the head-summed |v|^2
    at o's ring slot, the victim's slot, next step's ring slot ``ring_next`` and o's again."""
    n, (b, h, s) = len(sq), sq[0].shape
    K, M = keep, local
    width = 1 << max(K + M - 1, 1).bit_length()  # Triton blocks: a power of two, masked past K + M
    if start + K + M > s:
        raise ValueError(f"layer_choice: {K} pool and {M} ring slots from slot {start} pass the cache's {s}")
    choose = dots is not None
    row = pl.BlockSpec((None, h, s), lambda i, j: (i, 0, 0))
    sc = pl.BlockSpec((), lambda i, j: ())
    first, lanes = pl.pallas_call(
        functools.partial(_choice_kernel, n_layers=n, heads=h, start=start, K=K, M=M, width=width, eps=eps,
                          choose=choose, big=big),
        grid=(b, n), in_specs=[sc, sc] + [row] * (n * (2 if choose else 1)),
        out_specs=[pl.BlockSpec((None, None), lambda i, j: (j, i)), pl.BlockSpec((None, None, 4), lambda i, j: (j, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((n, b), jnp.int32), jax.ShapeDtypeStruct((n, b, 4), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="adsa_layer_choice",
    )(jnp.asarray(ring, jnp.int32), jnp.asarray(ring_next, jnp.int32), *sq, *(dots if choose else ()))
    return first[..., None], lanes
