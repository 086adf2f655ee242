"""LlamaGen's 2D rotary position embedding.

The table has ``c`` rows of zeros for the condition positions (cos = sin = 0, so their q/k
become exactly zero: LlamaGen was trained this way) followed by ``g*g`` grid rows, row-major.
Pairs are interleaved (2k, 2k+1); the first d/4 pairs rotate by the row index, the last d/4
by the column index, with frequencies ``base^(-2m/(d/2))``.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def rope_table(grid: int, head_dim: int, base: float, cls_token_num: int) -> np.ndarray:
    """(c + g*g, d/2, 2) float32 table of (cos, sin); built in float64 on the host."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float64) / half))  # (d/4,)
    # LlamaGen computes the angles in float32 (torch.outer on float32 tensors).
    freqs = freqs.astype(np.float32)
    t = np.arange(grid, dtype=np.float32)
    f = np.outer(t, freqs).astype(np.float32)  # (g, d/4)
    rows = np.broadcast_to(f[:, None, :], (grid, grid, half // 2))  # angle from the row index
    cols = np.broadcast_to(f[None, :, :], (grid, grid, half // 2))  # angle from the column index
    ang = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, half)  # (g*g, d/2), row-major cells
    cache = np.stack([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)  # (g*g, d/2, 2)
    cond = np.zeros((cls_token_num, half, 2), np.float32)
    return np.concatenate([cond, cache], axis=0)


def apply_rope(x: jnp.ndarray, rot: jnp.ndarray) -> jnp.ndarray:
    """x: (B, T, H, D); rot: (T, D/2, 2) or (B, T, D/2, 2). Computed in float32, cast back."""
    b, t, h, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, t, h, d // 2, 2)  # (B, T, H, D/2, pair)
    if rot.ndim == 3:
        rot = rot[None]
    cos = rot[:, :, None, :, 0]  # (B|1, T, 1, D/2)
    sin = rot[:, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(b, t, h, d).astype(x.dtype)  # (B, T, H, D)
