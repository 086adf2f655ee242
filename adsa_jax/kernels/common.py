"""The Pallas Triton API the kernels are written against (jax 0.10/0.11)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..options import pallas_available

try:  # Pallas is part of jax; an older jax without these Triton APIs keeps the XLA paths
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    pl = plgpu = None


def available() -> bool:
    """Whether this jax has the Pallas Triton API the kernels are written against."""
    return pallas_available()


def widen(x, by_bits: bool = False):
    """x in float32. by_bits: a bfloat16 block widened by its bits (the 16-bit pattern shifted into a
    float32's high half, which is what bf16 is: the same values, NaN and subnormals included) rather
    than by astype, which Triton and ptxas compile to three integer instructions a pair of values
    (PRMT, two SHF) against two (LOP3, SHF)."""
    if not by_bits or x.dtype != jnp.bfloat16:
        return x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)
