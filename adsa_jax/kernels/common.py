"""The Pallas Triton API the kernels are written against (jax 0.10/0.11)."""
from __future__ import annotations

from ..options import pallas_available

try:  # Pallas is part of jax; an older jax without these Triton APIs keeps the XLA paths
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    pl = plgpu = None


def available() -> bool:
    """Whether this jax has the Pallas Triton API the kernels are written against."""
    return pallas_available()
