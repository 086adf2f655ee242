"""Pallas (Triton) decode kernels for GPUs, one module each, tuned by :class:`adsa_jax.options.KernelConfig`
(passed explicitly: no module holds a tuning switch):

- :mod:`.attention`  :func:`decode_attention`, one query per row and head over a cache (every policy),
  optionally with ADSA's score terms.
- :mod:`.evict_step` :func:`evict_step`, a whole ``dense`` / ``window`` / ``adsa-evict`` layer step.
- :mod:`.layer_choice` :func:`layer_choice`, adsa-evict's per-layer victims (layer granularity)
  for every layer of a step.
- :mod:`.kth`        :func:`kth_largest`, top-k's threshold without a sort.
- :mod:`.top_indices` :func:`top_indices`, ``lax.top_k``'s indices without a sort (adsa-evict's
  leaving step at period s > 1).
- :mod:`.gemv`       :func:`small_matmul`, the decode step's weight GEMMs at 1-16 rows.
- :mod:`.add_norm`   :func:`matmul_add_norm`, a GEMV's partial sum + residual add + RMSNorm.

The XLA paths (:func:`adsa_jax.cache.attend`, the model's einsums, ``lax.sort``) stay the
reference: ``interpret=True`` runs every kernel on any backend for the tests.
"""
from .add_norm import add_rms_norm, matmul_add_norm
from .attention import decode_attention
from .common import available
from .evict_step import evict_step
from .gemv import gemv_partials, gemv_tiling, small_matmul
from .kth import kth_largest
from .layer_choice import layer_choice
from .top_indices import top_indices

__all__ = ["decode_attention", "evict_step", "layer_choice", "kth_largest", "top_indices", "small_matmul", "gemv_partials",
           "gemv_tiling", "add_rms_norm", "matmul_add_norm", "available"]
