"""matmul_add_norm / add_rms_norm: a GEMV's partial sum + residual add + the next RMSNorm in one kernel."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..options import KernelConfig
from .common import pl, plgpu
from .gemv import gemv_partials


# At batch 1, after the wo and w2 GEMVs, XLA runs two small kernels each time, the partial sum +
# residual add and the next RMSNorm (~1.3 + 1.75 us, launch-bound). add_rms_norm does both in one
# kernel, one program per row (KernelConfig.add_norm: whether a decode step on the GEMV uses it).
# H200, GPT-XL 256 px batch 1: chunks of 8 partials over 8 warps took 3.2 / 2.8 us (wo's 20
# partials / w2's 14), no faster than XLA's two kernels (0.313 vs 0.309 s); 16 partials per load
# over 16 warps: 0.301 vs 0.310 s (32 over 16: 0.303; over 32: 0.310; 16 over 8 or 32 warps, 8 or 4
# over 16: 0.306-0.313).


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _add_norm_kernel(p_ref, x_ref, w_ref, xo_ref, h_ref, *, n_parts, chunk, eps):
    # One program = one row r: x' = x + sum_s p[s, r] (the sum rounded to x's dtype first, as
    # x + small_matmul(...) is), h = rms_norm(x', w) in model.rms_norm's order. Rows of n columns
    # load as power-of-two tiles, the columns past n masked.
    r = pl.program_id(0)
    z = r * 0  # a traced 0: tiles reach past the arrays' ends (masked), which static starts may not
    n = x_ref.shape[-1]
    cols = _pow2(n)
    col_ok = jnp.arange(cols) < n
    acc = jnp.zeros((cols,), jnp.float32)
    for s0 in range(0, n_parts, chunk):  # unrolled: the loads are independent, issued together
        ok = ((s0 + jnp.arange(chunk)) < n_parts)[:, None] & col_ok[None, :]
        acc = acc + jnp.sum(plgpu.load(p_ref.at[pl.ds(z + s0, chunk), r, pl.ds(z, cols)], mask=ok, other=0.0), axis=0)
    dt = x_ref.dtype
    x = plgpu.load(x_ref.at[r, pl.ds(z, cols)], mask=col_ok, other=0.0)  # (cols,)
    xn = (x.astype(jnp.float32) + acc.astype(dt).astype(jnp.float32)).astype(dt)
    xf = xn.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.sum(xf * xf) / n + eps)).astype(dt)
    w = plgpu.load(w_ref.at[pl.ds(z, cols)], mask=col_ok, other=0.0)
    plgpu.store(xo_ref.at[r, pl.ds(z, cols)], xn, mask=col_ok)
    plgpu.store(h_ref.at[r, pl.ds(z, cols)], (y.astype(jnp.float32) * w.astype(jnp.float32)).astype(dt), mask=col_ok)


def add_rms_norm(parts, x, weight, eps: float, *, config: KernelConfig = KernelConfig(), interpret: bool = False):
    """parts (S, M, N) float32, x (M, N), weight (N,) -> (x + sum_s parts[s], its RMSNorm times
    weight), both (M, N) in x's dtype, in one kernel; as model.rms_norm(x + sum.astype(x.dtype))."""
    sp, m, n = parts.shape
    return tuple(pl.pallas_call(
        functools.partial(_add_norm_kernel, n_parts=sp, chunk=min(config.add_norm_chunk, _pow2(sp)), eps=eps),
        grid=(m,),
        in_specs=[pl.BlockSpec((sp, m, n), lambda r: (0, 0, 0)), pl.BlockSpec((m, n), lambda r: (0, 0)),
                  pl.BlockSpec((n,), lambda r: (0,))],
        out_specs=[pl.BlockSpec((m, n), lambda r: (0, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((m, n), x.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=config.add_norm_num_warps, num_stages=1),
        interpret=interpret, name="adsa_add_norm",
    )(parts, x, weight.astype(x.dtype)))


def matmul_add_norm(h, w, x, norm_weight, *, eps: float, config: KernelConfig = KernelConfig(),
                    interpret: bool = False):
    """(x + h @ w, RMSNorm of that times norm_weight) for h (M, K), w (K, N), x (M, N): the GEMV's
    partials summed in add_rms_norm. Where the GEMV does not tile, XLA's dot gives one partial."""
    parts = gemv_partials(h, w, config=config, interpret=interpret)
    if parts is None:
        parts = jnp.dot(h, w, preferred_element_type=jnp.float32)[None]  # (1, M, N)
    return add_rms_norm(parts, x, norm_weight, eps, config=config, interpret=interpret)
