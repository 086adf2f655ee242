"""Which path each backend gets. :func:`adsa_jax.options.kernel_config` is the one function that
resolves 'auto': a Pallas/Triton kernel only on a GPU (with the Triton API); a TPU, like a CPU, gets
XLA's attention, XLA's eviction, XLA's GEMMs and a sort for top-k. The generate program resolved
for a TPU is lowered for the TPU platform here (no TPU needed) and holds no custom call; the same
program resolved for a GPU holds the Triton kernels."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adsa_jax.cache import make_policy
from adsa_jax.config import ConfigError, GPTConfig, named_config
from adsa_jax.generate import _scalars, generate_program, prepare_condition, with_kernels
from adsa_jax.model import abstract_params
from adsa_jax.options import KernelConfig, SamplingConfig, kernel_config
from adsa_jax.sharding import make_mesh

XLA = ("xla", "xla", "sort", False)


def chosen(backend, policy_name, rows, *, pallas=True, mesh=None, base=None):
    cfg = named_config("GPT-XL", image_size=384)
    pol = make_policy(cfg, policy_name, **({} if policy_name == "dense" else {"budget": 0.5}))
    kc = kernel_config(cfg, pol, rows, jnp.bfloat16, mesh=mesh, base=base, backend=backend, pallas=pallas)
    one_kernel = with_kernels(pol, kc).one_kernel(rows, cfg.n_head)
    return (kc.attention, kc.gemm, kc.kth, kc.cublas), one_kernel, kc


@pytest.mark.parametrize("policy_name", ["dense", "adsa-evict"])
def test_each_backend_name_selects_its_path(policy_name):
    mesh = make_mesh(data=1)
    for rows in (2, 128):  # batch 1 and 64 with guidance: GPT-XL 384 px, bfloat16
        for backend in ("tpu", "cpu"):
            for m in (None, mesh):
                got, one_kernel, kc = chosen(backend, policy_name, rows, mesh=m)
                assert got == XLA and not one_kernel, (backend, rows, m, got)
                assert kc.stack_ffn == (m is None)  # one device: w1|w3 stacked (an XLA einsum)
        # a GPU: the attention / step kernel, the GEMV at a few rows, kth_largest, cuBLAS from 128 rows
        got, one_kernel, _ = chosen("gpu", policy_name, rows)
        assert got == ("pallas", "pallas" if rows <= 16 else "xla", "pallas", rows >= 128) and one_kernel, (rows, got)
        # a GPU mesh: no GEMV, kth or cuBLAS (one-device kernels); the attention kernels stay
        got, _, kc = chosen("gpu", policy_name, rows, mesh=mesh)
        assert got == ("pallas", "xla", "sort", False) and not kc.stack_ffn, (rows, got)
        # a GPU without the Triton API: XLA, cuBLAS as on any GPU
        got, one_kernel, _ = chosen("gpu", policy_name, rows, pallas=False)
        assert got == ("xla", "xla", "sort", rows >= 128) and not one_kernel, (rows, got)


def test_a_gpu_kernel_asked_for_on_tpu_is_refused():
    for base, flag in ((KernelConfig(attention="pallas"), "attention='pallas'"),
                       (KernelConfig(gemm="pallas"), "gemm='pallas'")):
        with pytest.raises(ConfigError, match=re.escape(flag) + ".*'tpu'"):
            chosen("tpu", "dense", 2, base=base)
    # the kernels' interpreter runs anywhere (slowly): an explicit choice, never 'auto'
    got, _, _ = chosen("tpu", "dense", 2, base=KernelConfig(attention="pallas-interpret"))
    assert got[0] == "pallas-interpret"


def _lowered_text(backend, platform, policy_name):
    cfg = GPTConfig(dim=128, n_layer=2, n_head=4, vocab_size=512, num_classes=10, block_size=64, multiple_of=32)
    pol = make_policy(cfg, policy_name, **({} if policy_name == "dense" else {"budget": 0.5}))
    sampling = SamplingConfig()  # LlamaGen's: guidance 4.0, top-k 2000
    kc = kernel_config(cfg, pol, 4, jnp.bfloat16, backend=backend, pallas=True)
    cond, mask = prepare_condition(cfg, np.arange(2))
    args = (abstract_params(cfg, jnp.bfloat16), cond, mask, jax.random.key(0), jnp.arange(2), _scalars(sampling))
    return generate_program(kc).trace(*args, cfg=cfg, policy=with_kernels(pol, kc), use_cfg=True, kernels=kc,
                                      top_p_on=sampling.top_p_on).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("policy_name", ["dense", "adsa-evict"])
def test_the_tpu_program_lowers_for_tpu_without_custom_calls(policy_name):
    tpu = _lowered_text("tpu", "tpu", policy_name)
    assert "custom_call" not in tpu
    gpu = _lowered_text("gpu", "cuda", policy_name)  # the same program resolved for a GPU: Triton kernels
    assert "__gpu$xla.gpu.triton" in gpu and "adsa_evict_step" in gpu
