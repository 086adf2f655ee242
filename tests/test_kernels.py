"""The Pallas decode-attention kernel (run by the Pallas interpreter on CPU) against the XLA path."""
import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import adsa_jax
from adsa_jax.config import ConfigError
from adsa_jax.cache import attend, make_policy
from adsa_jax.generate import with_kernels
from adsa_jax.kernels import decode_attention
from adsa_jax.model import init_params
from adsa_jax.options import GEMV_ROWS, KernelConfig, SamplingConfig, kernel_config

try:  # tests/ may or may not be a package
    from .layer_decode import layer_decode
except ImportError:  # pragma: no cover
    from layer_decode import layer_decode

# The kernels in the Pallas interpreter, nothing left to resolve (KernelConfig is a static jit
# argument, so each config compiles its own program: no test sees another's trace).
INTERPRET = KernelConfig(attention="pallas-interpret", gemm="xla", kth="sort", cublas=False)


def on_kernels(pol, **kw):
    """pol with the kernel path's config (its one_kernel / init see the switches in kw)."""
    return with_kernels(pol, dataclasses.replace(INTERPRET, **kw))


@pytest.mark.parametrize("b,h,s,d,g,n_valid,splits,block_k", [
    (2, 3, 20, 16, 1, 13, None, 16),   # a partial block, padding never read
    (2, 3, 200, 64, 3, 150, 4, 64),    # per-head mask, splits past n_valid are empty
    (1, 2, 257, 64, 1, 257, 8, 64),    # dense XL-like length, many splits
    (3, 2, 129, 32, 2, 129, 1, 32),    # one split
])
def test_kernel_matches_xla_attention(b, h, s, d, g, n_valid, splits, block_k):
    rng = np.random.default_rng(s)
    q = jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, h, s, d)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32)
    mask = jnp.asarray(rng.random((b, g, s)) > 0.3).at[:, :, 0].set(True)
    # Slots past n_valid hold garbage the kernel must not read into the result.
    k = k.at[:, :, n_valid:].set(1e6)
    ref = attend(q, k, v, mask & (jnp.arange(s) < n_valid))
    out = decode_attention(q, k, v, mask, n_valid, splits=splits, block_k=block_k, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=0)


# The XLA reference: the kernel switches and tiles steer the kernel path only, so one XLA program per
# policy serves every case (KernelConfig is part of the compile key: with the switches in it, each
# case would compile the same reference again).
XLA = KernelConfig(attention="xla")


def _assert_kernel_matches_xla(c2i, c2i_ref, pol, tokens=True, **switches):
    """Teacher-forced logits (CFG rows) within 1e-4 of the XLA path and (with ``tokens``) identical
    greedy tokens; returns the kernel path's tokens (or None). switches: KernelConfig fields of the
    kernel run. The logits pass through the same step kernels as generation, fed the fixture's
    tokens; ``tokens`` adds a generation on each path (twice the compile time on a CPU)."""
    labels = c2i_ref["labels"]
    xla, kern = XLA, KernelConfig(attention="pallas-interpret", **switches)
    ref = np.asarray(adsa_jax.score(c2i, labels, c2i_ref["greedy_cfg_tokens"],
                                    sampling=adsa_jax.SamplingConfig(cfg_scale=4.0), raw_rows=True, policy=pol,
                                    options=xla))
    got = np.asarray(adsa_jax.score(c2i, labels, c2i_ref["greedy_cfg_tokens"],
                                    sampling=adsa_jax.SamplingConfig(cfg_scale=4.0), raw_rows=True, policy=pol,
                                    options=kern))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    if not tokens:
        return None
    toks = adsa_jax.generate(c2i, labels, jax.random.key(1), sampling=adsa_jax.SamplingConfig(cfg_scale=4.0, top_k=1),
                             policy=pol, options=kern)
    want = adsa_jax.generate(c2i, labels, jax.random.key(1), sampling=adsa_jax.SamplingConfig(cfg_scale=4.0, top_k=1),
                             policy=pol, options=xla)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(want))
    return toks


# tokens: also generate on both paths (dense: against LlamaGen's own greedy tokens); one case of
# each kernel kind does, the others compare the teacher-forced logits through the same kernels.
@pytest.mark.parametrize("name,kw,one_kernel,tokens", [
    ("dense", {}, False, True), ("dense", {}, True, False), ("adsa-evict", {"budget": 0.5}, True, True),
    ("window", {"budget": 0.5}, True, False), ("adsa-evict", {"budget": 0.5}, False, True),
    ("window", {"budget": 0.5}, False, False), ("adsa-select", {"budget": 0.5}, False, False),
    ("adsa-evict", {"budget": 0.75, "granularity": "layer"}, False, False),
    ("adsa-evict", {"prefix": 4, "keep": 12, "local": 1}, True, False),  # a ring of one: the new token is a candidate
    ("adsa-evict-all", {"budget": 0.5}, True, False),  # no prefix either
    # (period s > 1 on the window's kernel: test_leave_score_in_kernel_gives_the_xla_tokens)
    ("adsa-evict", {"budget": 0.75, "granularity": "layer"}, True, False),  # the window's kernel, returning score terms
    # every layer's victim chosen before the layers (begin_step); a ring of one: the new token's norm
    ("adsa-evict", {"prefix": 4, "keep": 12, "local": 1, "granularity": "layer"}, True, False)])
def test_kernel_in_generation_matches_xla(c2i, c2i_ref, name, kw, one_kernel, tokens):
    """Logits within 1e-4 (and identical greedy tokens). dense, adsa-evict and window run either as
    one kernel per layer step (evict_step) or, with the switches off (and always for layer
    granularity and adsa-select), as the attention kernel with the bookkeeping in XLA. At period
    s > 1 and at layer granularity the step is the window's kernel after the XLA moves (q and k
    rotated in the kernel)."""
    pol = make_policy(c2i.config, name, **kw)
    rows, heads = 2 * len(c2i_ref["labels"]), c2i.config.n_head
    switches = dict(evict_one_kernel=one_kernel, dense_one_kernel=one_kernel)  # force the path either way
    if hasattr(pol, "one_kernel"):
        kern = on_kernels(pol, **switches)
        assert getattr(kern, "kernel_step", kern.one_kernel)(rows, heads) == one_kernel
    toks = _assert_kernel_matches_xla(c2i, c2i_ref, pol, tokens, **switches)
    if name == "dense" and tokens:
        np.testing.assert_array_equal(np.asarray(toks), c2i_ref["greedy_cfg_tokens"])


def test_layer_choice_unused_where_the_kernel_does_not_fit(c2i, c2i_ref):
    """Layer granularity on the kernel path: begin_step chooses every layer's victim for a step
    kernel that, for these rows and slots, does not run (one_kernel_fits is False); each layer's
    step drops the choice and runs the XLA moves around the attention kernel."""
    pol = make_policy(c2i.config, "adsa-evict", budget=0.75, granularity="layer")
    switches = dict(one_kernel_min_row_heads=10**6, one_kernel_max_slots=1)
    kern = on_kernels(pol, **switches)
    assert kern.layer_choice and not kern.kernel_step(2 * len(c2i_ref["labels"]), c2i.config.n_head)
    _assert_kernel_matches_xla(c2i, c2i_ref, pol, tokens=False, **switches)


@pytest.mark.parametrize("name,kw", [("dense", {}), ("adsa-evict", {"budget": 0.5}), ("window", {"budget": 0.5})])
def test_rope_before_the_kernel_matches_xla(c2i, c2i_ref, name, kw):
    """rope_in_kernel=False: XLA rotates q and k before the step kernel (by default the kernel
    does, tested above); logits within 1e-4 of the XLA path."""
    pol = make_policy(c2i.config, name, **kw)
    assert on_kernels(pol).one_kernel(2 * len(c2i_ref["labels"]), c2i.config.n_head)
    _assert_kernel_matches_xla(c2i, c2i_ref, pol, tokens=False, rope_in_kernel=False)


def test_kernel_with_caption_masks(t2i, t2i_ref):
    emb, masks = t2i_ref["caption_embs"], t2i_ref["emb_masks"]
    kern = KernelConfig(attention="pallas-interpret")
    toks = adsa_jax.generate(t2i, emb, jax.random.key(0), sampling=adsa_jax.SamplingConfig(cfg_scale=7.5, top_k=1),
                             cond_mask=masks, options=kern)
    np.testing.assert_array_equal(np.asarray(toks), t2i_ref["greedy_cfg_tokens"])
    # adsa-evict and window as one kernel: the caption mask reaches the kernel's condition slots
    # (dense's kernel has just matched the fixture's tokens).
    for name in ("adsa-evict", "window"):
        pol = make_policy(t2i.config, name, **({} if name == "dense" else {"budget": 0.5}))
        assert on_kernels(pol).one_kernel(2 * len(emb), t2i.config.n_head)
        got, want = (adsa_jax.generate(t2i, emb, jax.random.key(0),
                                       sampling=adsa_jax.SamplingConfig(cfg_scale=7.5, top_k=1), cond_mask=masks,
                                       policy=pol, options=KernelConfig(attention=a))
                     for a in ("pallas-interpret", "xla"))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kernel_lowers_for_gpu(c2i):
    """The Triton lowering runs at trace time: lowering for CUDA on a CPU host catches kernel errors."""
    from adsa_jax.generate import _generate_jit, _scalars, prepare_condition

    cond, mask = prepare_condition(c2i.config, np.array([1, 2]))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), c2i.params)  # bf16 caches

    def lowered(name, kth="sort", params=c2i.params, gemm="xla", switches=None, **kw):
        pol = make_policy(c2i.config, name, **kw)
        # As a GPU would resolve it; the fixture model's 192-wide layers tile by 64 for the GEMV.
        base = KernelConfig(attention="pallas", gemm=gemm, kth=kth, gemv_block_n=64, gemv_block_k=64, **(switches or {}))
        kc = kernel_config(c2i.config, pol, 4, params["output"].dtype, base=base, backend="gpu", pallas=True)
        return _generate_jit.trace(params, cond, mask, jax.random.key(0), jnp.arange(2),
                                   _scalars(SamplingConfig(top_k=0)), cfg=c2i.config, policy=with_kernels(pol, kc),
                                   use_cfg=True, kernels=kc, top_p_on=kth == "sort",
                                   ).lower(lowering_platforms=("cuda",)).as_text()

    for name, kw in (("window", {"budget": 0.5}), ("dense", {}), ("adsa-evict", {"budget": 0.5})):  # the defaults
        assert "adsa_evict_step" in lowered(name, **kw)
    assert "adsa_kth_largest" in lowered("dense", kth="pallas")  # top-k without a sort
    for name, kw in (("dense", {}), ("adsa-evict", {"budget": 0.5})):  # RoPE in XLA before the step kernel
        assert "adsa_evict_step" in lowered(name, switches={"rope_in_kernel": False}, **kw)
        assert "adsa_evict_step" in lowered(name, params=bf16, switches={"rope_in_kernel": False}, **kw)
    text = lowered("dense", params=bf16, gemm="pallas")  # the decode GEMMs on the GEMV kernel
    assert text.count("adsa_small_matmul") >= 4 and "adsa_evict_step" in text and "adsa_add_norm" in text
    assert "adsa_small_matmul" in lowered("adsa-evict", params=bf16, gemm="pallas", budget=0.5)
    text = lowered("adsa-evict", budget=0.5, granularity="layer")  # the move in XLA, then the window's kernel
    assert "adsa_evict_step" in text and "adsa_decode_attention" not in text
    assert "adsa_evict_step" in lowered("adsa-evict-all", budget=0.5)  # P = 0 and a ring of one
    for gran in ("head", "layer"):  # period s > 1: the moves in XLA, the step as the window's kernel
        text = lowered("adsa-evict", budget=0.5, period=3, granularity=gran)
        assert "adsa_evict_step" in text and "adsa_decode_attention" not in text
        assert "adsa_top_indices" in text  # the leaving step's top_k without a sort
        assert "adsa_top_indices" not in lowered("adsa-evict", budget=0.5, period=3, granularity=gran,
                                                 switches={"leave_top_in_kernel": False})
        # the leaving steps scheduled statically: no branch (XLA:GPU waits for the stream at each one)
        assert text.count("stablehlo.case") == 0
        # without the schedule, one branch per step for every layer's moves
        text = lowered("adsa-evict", budget=0.5, period=3, granularity=gran, switches={"period_blocks": False})
        assert c2i.config.n_layer > 1 and text.count("stablehlo.case") == 1
    off = {"evict_one_kernel": False, "dense_one_kernel": False}
    for kw in ({"period": 3}, {"granularity": "layer"}):
        assert "adsa_decode_attention" in lowered("adsa-evict", budget=0.5, switches=off, **kw)
    for name, kw in (("dense", {}), ("adsa-evict", {"budget": 0.5})):
        assert "adsa_decode_attention" in lowered(name, switches=off, **kw)


@pytest.mark.parametrize("name,kw", [("adsa-evict", dict(period=3)), ("adsa-evict", dict(period=4, granularity="layer")),
                                     ("random", dict(period=3)), ("adsa-evict-all", dict(period=4)),
                                     ("adsa-evict", dict(granularity="layer")),
                                     ("adsa-evict", dict(granularity="layer", prefix=4, keep=12, local=1))])
def test_window_step_kernel_matches_xla(name, kw):
    """The moves in XLA, then evict_step's window form over the whole cache (period s > 1, and layer
    granularity, whose score terms for next step the kernel returns) evict the same tokens as the
    XLA path (equal final positions) and attend within float rounding. A ring of one slot: next
    step's candidate is the token just written."""
    pol = make_policy(adsa_jax.GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=64, num_classes=10, block_size=64),
                      name, **({} if "keep" in kw else {"budget": 0.5}), **kw)
    kern = on_kernels(pol)
    assert kern.kernel_step(3, 2) and not on_kernels(pol, evict_one_kernel=False).kernel_step(3, 2)
    (want, want_pos), (got, got_pos) = layer_decode(pol), layer_decode(kern)
    np.testing.assert_array_equal(got_pos, want_pos)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    # blocks of 4 slots: the filled slots as two ranges (prefix and pool, ring) with a gap between
    (got, got_pos) = layer_decode(on_kernels(pol, evict_tiers=((0, 4, 1),)))
    np.testing.assert_array_equal(got_pos, want_pos)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name,kw", [("adsa-evict", {}), ("adsa-evict", dict(granularity="layer", period=3)),
                                     ("adsa-evict", dict(period=4)), ("random-uniform", {}), ("window", {}),
                                     ("adsa-evict-all", dict(period=2)), ("line", {})])
def test_filled_ranges_hold_every_token(name, kw):
    """The kernels read only Evict.filled(t): after every step each slot holding a token lies in it,
    and at period 1 it is exactly as many slots as the step attends (what the roofline counts)."""
    cfg = adsa_jax.GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=64, num_classes=10, block_size=64)
    pol = make_policy(cfg, name, budget=0.5, **kw)
    rows, heads, d, c = 2, 2, 8, pol.c
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(pol.n - 1, rows, heads, d)), jnp.float32) for _ in range(3))
    keys = jax.random.split(jax.random.key(1), rows)

    def body(cache, t):
        cache, _ = pol.decode(cache, q[t], k[t], v[t], t, jnp.ones((rows, c), bool), row_keys=keys)
        return cache, (cache["pos"] >= 0, *pol.filled(t))
    cache = pol.prefill(pol.init(rows, heads, d, jnp.float32), *(jnp.ones((rows, c, heads, d)),) * 2)
    _, (held, a, lo, hi) = jax.lax.scan(body, cache, jnp.arange(pol.n - 1))
    idx = np.arange(pol.slots)
    inside = (idx < np.asarray(a)[:, None]) | ((idx >= np.asarray(lo)[:, None]) & (idx < np.asarray(hi)[:, None]))
    held = np.asarray(held).any(axis=(1, 2))  # (steps, slots): a token in any row or head
    assert held.any(axis=0).all() and not (held & ~inside).any()
    if pol.period == 1:
        np.testing.assert_array_equal(inside.sum(axis=1), [pol.attended(t) for t in range(pol.n - 1)])


@pytest.mark.parametrize("name,kw", [("adsa-evict", dict(budget=0.5)), ("window", dict(budget=0.5)),
                                     ("adsa-evict", dict(prefix=4, keep=12, local=1)),
                                     ("adsa-evict-all", dict(budget=0.5))])
def test_one_kernel_step_in_small_blocks_matches_xla(name, kw):
    """The one-kernel step (moves, victim search and attention in evict_step) over blocks of 4
    slots, so it reads the filled slots as two ranges: the XLA path's tokens and outputs."""
    pol = make_policy(adsa_jax.GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=64, num_classes=10, block_size=64),
                      name, **kw)
    kern = on_kernels(pol, evict_tiers=((0, 4, 1),))
    assert kern.one_kernel(3, 2)
    (want, want_pos), (got, got_pos) = layer_decode(pol), layer_decode(kern)
    np.testing.assert_array_equal(got_pos, want_pos)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name,kw", [("adsa-evict", {}), ("adsa-evict", dict(granularity="layer")),
                                     ("adsa-evict", dict(granularity="layer", prefix=4, keep=12, local=1)),
                                     ("adsa-evict", dict(granularity="layer", period=3)),
                                     ("adsa-evict", dict(prefix=4, keep=12, local=1, period=3))])
def test_kernels_break_ties_as_xla(name, kw):
    """Every step's v one of three vectors, so candidates tie exactly: the kernel paths score equal V
    vectors equally (the moved token and, with a ring of one slot, the new one included) and evict
    the XLA path's tokens."""
    pol = make_policy(adsa_jax.GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=64, num_classes=10, block_size=64),
                      name, **({} if "keep" in kw else {"budget": 0.5}), **kw)
    want, want_pos = layer_decode(pol, head_dim=64, repeat=3)
    # a ring of one slot at layer granularity also with the move in XLA, then the window's kernel
    old = pol.granularity == "layer" and pol.period == 1 and pol.local == 1
    for kern in (on_kernels(pol),) + ((on_kernels(pol, layer_move_in_kernel=False),) if old else ()):
        assert kern.kernel_step(3, 2)
        got, got_pos = layer_decode(kern, head_dim=64, repeat=3)
        np.testing.assert_array_equal(got_pos, want_pos)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_attention_choice_errors(c2i):
    cfg = c2i.config
    pol = make_policy(cfg, "dense")
    gpu = jax.default_backend() == "gpu"

    def attention(pol, cfg, requested="auto", rows=2, **kw):
        return kernel_config(cfg, pol, rows, jnp.float32, base=KernelConfig(attention=requested), **kw).attention

    assert attention(pol, cfg) == ("pallas" if gpu else "xla")  # a short cache: the one-kernel step at batch 1
    evict = make_policy(cfg, "adsa-evict", budget=0.5)
    assert attention(evict, cfg) == ("pallas" if gpu else "xla")
    assert attention(pol, cfg, backend="gpu", pallas=True) == "pallas"
    with pytest.raises(ConfigError, match="attention must be"):
        KernelConfig(attention="cudnn")
    if not gpu:  # a policy for the kernels can be built here (to lower for CUDA); running it is refused
        for run in (lambda: adsa_jax.generate(c2i, np.array([1]), jax.random.key(0),
                                              options=KernelConfig(attention="pallas")),
                    lambda: adsa_jax.score(c2i, np.array([1]), np.zeros((1, 64), np.int32),
                                           options=KernelConfig(attention="pallas"))):
            with pytest.raises(ConfigError, match="compiles for a GPU"):
                run()
    odd = dataclasses.replace(cfg, dim=cfg.n_head * 24)  # head_dim 24: not a power of two
    with pytest.raises(ConfigError, match="power-of-two head_dim"):
        attention(pol, odd, "pallas")
    assert attention(pol, odd, backend="gpu", pallas=True) == "xla"

    from adsa_jax import kernels

    assert kernels.available()  # the jax this project pins has the Pallas Triton API
    with pytest.raises(ConfigError, match="Pallas Triton API"):  # an older jax without it
        attention(pol, cfg, "pallas", pallas=False)
    assert attention(evict, cfg, backend="gpu", pallas=False) == "xla"

    class Mine:  # a policy of the user's own, without the kernels field: keeps XLA's attention
        pass

    assert isinstance(with_kernels(Mine(), INTERPRET, KernelConfig()), Mine)
    with pytest.raises(ConfigError, match="no 'kernels' field"):
        with_kernels(Mine(), INTERPRET, KernelConfig(attention="pallas-interpret"))


@pytest.mark.parametrize("name", ["dense", "dense one kernel", "adsa-evict", "window"])
def test_kernel_small_blocks_match_xla(c2i, c2i_ref, name):
    """Blocks of 16 slots: several blocks per program (the victim's first maximum across
    blocks, the in-register view of this step's writes in any block) and, for dense, splits."""
    from adsa_jax.kernels.attention import _splits

    small = dict(block_k=16, evict_tiers=tuple((least, 16, warps) for least, _, warps in KernelConfig().evict_tiers),
                 evict_one_kernel=True, dense_one_kernel=name == "dense one kernel")
    labels = c2i_ref["labels"]
    pol = make_policy(c2i.config, name.split()[0], **({} if name.startswith("dense") else {"budget": 0.5}))
    rows, heads = 2 * len(labels), c2i.config.n_head
    if name == "dense":
        assert _splits(rows * heads, pol.slots, 16) > 1
    else:
        assert on_kernels(pol, **small).one_kernel(rows, heads) and pol.slots > 2 * 16
    got, want = (adsa_jax.score(c2i, labels, c2i_ref["greedy_cfg_tokens"],
                                sampling=adsa_jax.SamplingConfig(cfg_scale=4.0), raw_rows=True, policy=pol,
                                options=opts)
                 for opts in (KernelConfig(attention="pallas-interpret", **small), XLA))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_one_kernel_switches():
    """dense, window and adsa-evict steps run as one kernel wherever KernelConfig.one_kernel_fits:
    any batch over a cache of up to one_kernel_max_slots (GPT-B 256 and 384 px), and from 256
    row-heads over a longer one (dense at 640 px, 1601 slots); the switches turn it off; adsa-select
    and layer granularity never do. Dense at batch 1 over a long cache keeps XLA attention under
    'auto'."""
    from adsa_jax.config import named_config

    small, large = 2, 32  # batch 1 and 16 with CFG: 24 and 384 row-heads for GPT-B's 12 heads
    max_slots = KernelConfig().one_kernel_max_slots
    off = dict(evict_one_kernel=False, dense_one_kernel=False)
    for size in (256, 384, 640):
        cfg = named_config("GPT-B", image_size=size)
        made = [make_policy(cfg, n, **kw) for n, kw in (("adsa-evict", {"budget": 0.5}), ("window", {"budget": 0.5}),
                                                        ("dense", {}))]
        pols = [on_kernels(p) for p in made]
        for pol in pols:
            assert pol.one_kernel(large, cfg.n_head)
            assert pol.one_kernel(small, cfg.n_head) == (pol.slots <= max_slots)
        assert pols[0].slots <= max_slots
        assert (pols[2].slots > max_slots) == (size == 640)
        assert "victim" in pols[0].init(large, cfg.n_head, cfg.head_dim, jnp.bfloat16)
        others = [on_kernels(make_policy(cfg, n, **kw)) for n, kw in
                  (("adsa-select", {"budget": 0.5}), ("adsa-evict", {"budget": 0.5, "granularity": "layer"}))]
        assert not any(pol.one_kernel(large, cfg.n_head) for pol in others)
        switched = [on_kernels(p, **off) for p in made]
        assert not any(pol.one_kernel(large, cfg.n_head) for pol in switched)
        assert "victim" not in switched[0].init(large, cfg.n_head, cfg.head_dim, jnp.bfloat16)
    long_evict = make_policy(cfg, "adsa-evict", budget=0.9)  # 640 px: over one_kernel_max_slots slots
    assert long_evict.slots > max_slots
    assert not on_kernels(long_evict).one_kernel(small, cfg.n_head)

    def auto(cfg, rows):  # 'auto' as on a GPU
        return kernel_config(cfg, make_policy(cfg, "dense"), rows, jnp.bfloat16, backend="gpu", pallas=True).attention

    # Dense at batch 1 takes XLA attention only over a cache too long for one kernel.
    assert auto(cfg, small) == "xla"
    assert auto(cfg, large) == "pallas"
    assert auto(named_config("GPT-B", image_size=384), small) == "pallas"


def test_evict_tiling_by_grid():
    """evict_step's block and warps follow the grid: wide blocks over many warps for few programs
    (batch 1), then narrower ones from each tier's least row-heads; explicit arguments win."""
    from adsa_jax.kernels import evict_step

    kc = KernelConfig()
    (hi, large), (m, high), (lo, mid), (zero, small) = ((t[0], t[1:]) for t in kc.evict_tiers)
    assert len({small, mid, high, large}) == 4 and zero == 0 < lo < m < hi
    assert ([kc.evict_tile(n) for n in (1, lo - 1, lo, m - 1, m, hi - 1, hi, 10 * hi)]
            == [small, small, mid, mid, high, high, large, large])
    b, h, s, d = 1, 2, 24, 16
    z = jnp.zeros((b, h, d), jnp.float32)
    cache = jnp.zeros((b, h, s, d), jnp.float32)
    scalars = (3, 0, 0, 0, 0, 0, 3)

    def traced(**kw):  # (the kernel's jaxpr, its compiler params) as text
        jaxpr = jax.make_jaxpr(lambda q: evict_step(q, q, q, cache, cache, None, jnp.ones((b, s), bool), scalars, c=1,
                                                     prefix=0, keep=0, interpret=True, **kw))(z)
        eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call")
        return str(eqn.params["jaxpr"]), str(eqn.params["compiler_params"])

    def uses(tile, **kw):  # a block of `tile[0]` slots (the lanes' iota) over `tile[1]` warps
        body, params = traced(**kw)
        return f"iota[dimension=0 dtype=int32 shape=({tile[0]},)" in body and f"num_warps={tile[1]}," in params

    assert uses(small) and not uses(large)  # b * h = 2 programs
    assert uses(large, config=KernelConfig(evict_tiers=((0,) + large,)))
    assert uses((8, 4), block_k=8, num_warps=4)


@pytest.mark.parametrize("victim_in,want", [(4, 4), (13, 7)])
def test_evict_step_victim_ties_lowest_slot(victim_in, want):
    """Exact score ties (equal V vectors) go to the lowest slot, also when one of them is the token
    moving into the pool this step (scored where the loaded block still holds it, in the ring)."""
    from adsa_jax.kernels import evict_step

    b, h, d, c, P, K, M = 1, 1, 16, 1, 2, 12, 3
    s = c + P + K + M  # pool slots 3..14, ring 15..17
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32)
    t, ws = 30, 15  # the ring slot 15 holds o; the pool is full, this step's victim is victim_in
    v_o = v[0, 0, ws]
    v = v.at[0, 0, 7].set(v_o).at[0, 0, 11].set(v_o)  # two pool copies of o's V
    vsum = (100.0 * v_o / jnp.linalg.norm(v_o))[None, None]  # o's direction scores highest
    vnorm = jnp.maximum(jnp.linalg.norm(v, axis=-1), 1e-6)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, h, s))
    rn = c + P + K + (t + 1 - P) % M
    scalars = (ws, ws, 1, 1, K - 1, rn, c + t)
    q, kn, vn = (jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32) for _ in range(3))
    res = evict_step(q, kn, vn, k, v, pos, jnp.ones((b, s), bool), scalars, c=c, prefix=P, keep=K, vsum=vsum,
                     victim=jnp.full((b, h), victim_in, jnp.int32), vnorm=vnorm, block_k=4, interpret=True)
    v_out = np.asarray(res[2])[0, 0]
    np.testing.assert_array_equal(v_out[victim_in], np.asarray(v_o))  # o moved into the victim's slot
    assert int(res[5][0, 0]) == want


def test_evict_step_static_scoring_and_its_tile():
    """scoring=True (every step scores) gives the per-step kernel's outputs and victim at a step
    that scores, also over score_tile's own blocks (traced: that block and warps, the default tile
    without scoring=True); scoring=False at a step before the pool fills, the same outputs and the
    placeholder victim S."""
    from adsa_jax.kernels import evict_step

    b, h, d, c, P, K, M = 2, 2, 16, 1, 2, 12, 3
    s = c + P + K + M
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32) for _ in range(2))
    vnorm = jnp.maximum(jnp.linalg.norm(v, axis=-1), 1e-6)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, h, s))
    vsum = jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32)
    q, kn, vn = (jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32) for _ in range(3))

    def step(t, **kw):
        ws, n_moved = c + P + K + (t - P) % M, t - P - M
        scalars = (ws, ws, int(n_moved >= 0), int(n_moved >= K), min(max(n_moved, 0), K - 1),
                   c + P + K + (t + 1 - P) % M, c + t)
        return evict_step(q, kn, vn, k, v, pos, jnp.ones((b, s), bool), scalars, c=c, prefix=P, keep=K, vsum=vsum,
                          victim=jnp.full((b, h), 5, jnp.int32), vnorm=vnorm, interpret=True, **kw)
    t_sc, t_plain = P + M + K + 3, P + M + K - 3  # a step that scores, one before the step before the pool fills
    tile = KernelConfig(score_tile=(4, 2))
    for t, scoring, config in ((t_sc, True, KernelConfig()), (t_sc, True, tile), (t_plain, False, tile)):
        want, got = step(t), step(t, scoring=scoring, config=config)
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(got[5]), np.asarray(want[5]))  # next step's victim
    assert (np.asarray(got[5]) == s).all() and (np.asarray(step(t_sc)[5]) < s).all()

    def params(**kw):
        jaxpr = jax.make_jaxpr(lambda q: step(t_sc, **kw))(q)
        eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call")
        return str(eqn.params["jaxpr"]), str(eqn.params["compiler_params"])
    body, cp = params(scoring=True, config=tile)
    assert "iota[dimension=0 dtype=int32 shape=(4,)" in body and "num_warps=2," in cp
    for kw in (dict(config=tile), dict(scoring=False, config=tile)):
        assert "iota[dimension=0 dtype=int32 shape=(4,)" not in params(**kw)[0]
    with pytest.raises(ConfigError, match="score_tile must be None or"):
        KernelConfig(score_tile=(16,))


@pytest.mark.parametrize("keep", [0, 5])
@pytest.mark.parametrize("rope_in_kernel", [None, False, True])
def test_evict_step_reads_stacked_qkv(keep, rope_in_kernel):
    """qkv= (B, 3, H, D), the projection's layout read in place, gives exactly what separate
    q, k_new, v_new give (each output, every slot); with rope= (q and k before RoPE), RoPE in
    XLA before the call or in the kernel (rope_in_kernel) gives that too."""
    from adsa_jax.kernels import evict_step
    from adsa_jax.rope import apply_rope, rope_table

    b, h, d, c, P, M = 2, 3, 16, 1, 2, 4
    s = c + P + keep + M
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.bfloat16) for _ in range(2))
    qkv = jnp.asarray(rng.normal(size=(b, 3, h, d)), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, h, s))
    t = 20
    ws = c + P + keep + (t - P) % M
    scalars = (ws, ws, 1, 1, max(keep - 1, 0), c + P + keep + (t + 1 - P) % M, c + t)
    kw = dict(c=c, prefix=P, keep=keep, block_k=4, interpret=True)
    if keep:
        kw.update(vsum=jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32), victim=jnp.full((b, h), c + P + 1, jnp.int32),
                  vnorm=jnp.maximum(jnp.linalg.norm(v.astype(jnp.float32), axis=-1), 1e-6))
    cond_ok = jnp.ones((b, s), bool)
    raw = qkv
    if rope_in_kernel is not None:
        rot = jnp.asarray(rope_table(4, d, 10000.0, c)[c + 5])  # (D/2, 2), grid cell 5
        qkv = jnp.concatenate([apply_rope(raw[:, :2], jnp.broadcast_to(rot, (2,) + rot.shape)), raw[:, 2:]], axis=1)
        kw["rope"] = rot
        kw["config"] = KernelConfig(rope_in_kernel=rope_in_kernel)
    # the reference without rope= needs no config: one program for the three RoPE variants
    apart = evict_step(qkv[:, 0], qkv[:, 1], qkv[:, 2], k, v, pos, cond_ok, scalars,
                       **{n: x for n, x in kw.items() if n not in ("rope", "config")})
    stacked = evict_step(None, None, None, k, v, pos, cond_ok, scalars, qkv=raw, **kw)
    assert len(apart) == len(stacked) == (7 if keep else 4)
    for x, y in zip(apart, stacked):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    np.testing.assert_array_equal(np.asarray(stacked[2], np.float32)[:, :, ws], np.asarray(qkv[:, 2], np.float32))


def _uses_pallas(f, *args):
    return "pallas_call" in str(jax.make_jaxpr(f)(*args))


@pytest.mark.parametrize("m,k,n,splits", [(1, 256, 384, None), (2, 384, 192, 3), (7, 256, 128, 1), (16, 512, 64, 4)])
def test_small_matmul_matches_dot(m, k, n, splits):
    """The split-K GEMV (interpreter): float32 within float32 rounding of a float64 product, bf16
    within bf16 output rounding; rows below GEMV_ROWS are masked loads, never garbage."""
    from adsa_jax import kernels

    kc = KernelConfig(gemv_block_n=64, gemv_block_k=64)
    rng = np.random.default_rng(m * 1000 + k)
    x, w = rng.standard_normal((m, k)), rng.standard_normal((k, n)) / np.sqrt(k)
    want = x @ w
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        xd, wd = jnp.asarray(x, dt), jnp.asarray(w, dt)
        f = lambda a, b: kernels.small_matmul(a, b, splits=splits, config=kc, interpret=True)  # noqa: E731
        assert _uses_pallas(f, xd, wd)
        got = f(xd, wd)
        assert got.dtype == dt and got.shape == (m, n)
        exact = np.asarray(xd, np.float64) @ np.asarray(wd, np.float64)  # the inputs as stored
        np.testing.assert_allclose(np.asarray(got, np.float64), exact, atol=tol * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("m", [2, 16])
def test_small_matmul_lowers_for_gpu(m):
    """GPT-XL's qkv shape, bf16, lowered for CUDA on a CPU host (Triton's tile rules)."""
    from adsa_jax import kernels

    x, w = jnp.ones((m, 1280), jnp.bfloat16), jnp.ones((1280, 3840), jnp.bfloat16)
    text = jax.jit(kernels.small_matmul).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("adsa_small_matmul") >= 1


def test_small_matmul_falls_back_where_it_does_not_apply():
    """Shapes that do not tile, more than GEMV_ROWS rows, or a gemv_tiles entry of None: jnp.dot,
    with the same result."""
    from adsa_jax import kernels

    rng = np.random.default_rng(0)
    for m, k, n in ((2, 200, 128), (2, 256, 96), (GEMV_ROWS + 1, 256, 128)):
        x, w = jnp.asarray(rng.standard_normal((m, k)), jnp.float32), jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        f = lambda a, b: kernels.small_matmul(a, b, block_n=64, block_k=64, interpret=True)  # noqa: E731
        assert not _uses_pallas(f, x, w)
        np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(x) @ np.asarray(w), atol=1e-4, rtol=1e-5)
    x, w = jnp.ones((2, 256)), jnp.ones((256, 128))
    off = KernelConfig(gemv_tiles={(256, 128): None})
    assert not _uses_pallas(lambda a, b: kernels.small_matmul(a, b, config=off, interpret=True), x, w)
    tiled = KernelConfig(gemv_tiles={(256, 128): (32, 64, 2)})
    assert "grid=(4, 2)" in str(jax.make_jaxpr(lambda a, b: kernels.small_matmul(a, b, config=tiled, interpret=True))(x, w))


@pytest.mark.parametrize("shape,s", [((3, 4, 224), 8), ((5, 17), 3), ((2, 3, 40), 16), ((7, 9), 9), ((33, 5), 1),
                                     ((3, 700), 5)])  # wider rows: fewer a program
def test_top_indices_matches_top_k(shape, s):
    """lax.top_k's indices in its order (descending, equal values by lower index, -0.0 below
    +0.0, NaN above +inf), with many exact ties, rows that are not a multiple of a program's
    and widths that are not powers of two."""
    from adsa_jax.kernels import top_indices

    x = np.random.default_rng(s).normal(size=shape).astype(np.float32).reshape(-1)
    for start, step, val in ((0, 5, 1.0), (1, 7, 0.0), (2, 11, -0.0), (3, 13, 3e38), (4, 17, np.inf), (6, 19, np.nan)):
        x[start::step] = val
    x = jnp.asarray(x.reshape(shape))
    np.testing.assert_array_equal(np.asarray(top_indices(x, s, interpret=True)), np.asarray(jax.lax.top_k(x, s)[1]))
    with pytest.raises(ValueError, match="s must be in"):
        top_indices(x, shape[-1] + 1, interpret=True)


def test_kth_largest_matches_sort():
    """The bitwise search (interpreter): exactly sort's k-th largest, ties counted, for k from 1 to
    V, on rows with ties, both zeros, tiny and huge magnitudes and a non-power-of-two length
    (padded lanes never count)."""
    from adsa_jax import kernels

    rng = np.random.default_rng(1)
    rows = [rng.standard_normal((2, 1000)) * 3, rng.integers(-3, 3, (2, 1000)),
            np.concatenate([rng.standard_normal((1, 1000)) * 1e-30, rng.standard_normal((1, 1000)) * 1e30])]
    for x in rows:
        x = np.asarray(x, np.float32)
        x[0, :2] = (-0.0, 0.0)
        for k in (1, 2, 7, 333, 999, 1000):
            got = np.asarray(kernels.kth_largest(jnp.asarray(x), k, interpret=True))
            np.testing.assert_array_equal(got, -np.sort(-x, axis=1)[:, k - 1], err_msg=f"k={k}")
    # Work per pass: one threshold counted (counting digit 0 too doubled the kernel's time on the GPU).
    jaxpr = str(jax.make_jaxpr(lambda x: kernels.kth_largest(x, 3, interpret=True))(jnp.ones((1, 64))))
    assert "bool[64]" in jaxpr and "bool[2,64]" not in jaxpr


@pytest.mark.parametrize("sp,m,n,dtype", [(20, 2, 1280, jnp.bfloat16), (14, 16, 1280, jnp.bfloat16),
                                            (3, 5, 192, jnp.float32), (1, 1, 1024, jnp.bfloat16)])
def test_add_rms_norm_matches_model(sp, m, n, dtype):
    """The fused partial sum + residual add + RMSNorm (interpreter) against x + sum and
    model.rms_norm: bf16 within one bf16 rounding step (the partials may sum in another order),
    float32 within float32 rounding; the masked columns past n never reach the result."""
    from adsa_jax import kernels
    from adsa_jax.model import rms_norm

    rng = np.random.default_rng(sp * 100 + n)
    parts = jnp.asarray(rng.standard_normal((sp, m, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, n)) * 3, dtype)
    w = jnp.asarray(rng.standard_normal(n), dtype)
    xn, h = kernels.add_rms_norm(parts, x, w, 1e-5, interpret=True)
    want_x = x + jnp.sum(parts, axis=0).astype(dtype)
    want_h = rms_norm(want_x, w, 1e-5)
    assert xn.dtype == h.dtype == dtype and xn.shape == h.shape == (m, n)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    for got, want in ((xn, want_x), (h, want_h)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol * float(jnp.abs(want.astype(jnp.float32)).max()))


def test_matmul_add_norm_with_and_without_the_gemv():
    """matmul_add_norm = (x + h @ w, its RMSNorm) whether the GEMV tiles the weight (its partials)
    or not (XLA's dot as one partial)."""
    from adsa_jax import kernels
    from adsa_jax.model import rms_norm

    rng = np.random.default_rng(1)
    for k in (256, 200):  # 200: no K block divides it, so no GEMV
        h, w = jnp.asarray(rng.standard_normal((2, k)), jnp.float32), jnp.asarray(rng.standard_normal((k, 128)), jnp.float32)
        x, nw = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32), jnp.asarray(rng.standard_normal(128), jnp.float32)
        f = lambda *a: kernels.matmul_add_norm(*a, eps=1e-6, interpret=True)  # noqa: E731
        assert str(jax.make_jaxpr(f)(h, w, x, nw)).count("pallas_call") == (2 if k == 256 else 1)
        xn, hn = f(h, w, x, nw)
        want = np.asarray(x, np.float64) + np.asarray(h, np.float64) @ np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(xn), want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(hn), np.asarray(rms_norm(jnp.asarray(want, jnp.float32), nw, 1e-6)),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,n", [(1280, 3840), (1280, 1280), (1280, 7168), (3584, 1280), (1280, 16384), (768, 2304)])
def test_gemv_tiling_rule(k, n):
    """The most K splits that divide K's blocks and keep at most gemv_programs programs."""
    from adsa_jax import kernels

    kc = KernelConfig()
    bn, bk, sp = kernels.gemv_tiling(k, n)
    blocks = k // bk
    assert (bn, bk) == (kc.gemv_block_n, kc.gemv_block_k) and blocks % sp == 0
    assert (n // bn) * sp <= kc.gemv_programs or sp == 1
    assert all((n // bn) * d > kc.gemv_programs for d in range(sp + 1, blocks + 1) if blocks % d == 0)
    assert kernels.gemv_tiling(k + bk // 2, n) is None and kernels.gemv_tiling(k, n, splits=blocks + 1) is None


@pytest.mark.parametrize("name,kw,attention,add_norm", [
    ("dense", {}, "xla", True), ("dense", {}, "pallas-interpret", False),
    ("adsa-evict", {"budget": 0.5}, "pallas-interpret", True)])  # the GEMMs do not depend on the policy
def test_small_row_gemms_in_generation(c2i, c2i_ref, name, kw, attention, add_norm):
    """gemm='pallas-interpret' (every weight GEMM of the decode steps on small_matmul; with add_norm
    the residual adds and RMSNorms after wo and w2 in add_rms_norm), float32: the fixture's greedy
    CFG tokens for dense (LlamaGen's own), the XLA path's for the others."""
    pol = make_policy(c2i.config, name, **kw)
    labels = c2i_ref["labels"]

    def run(p, gemm):  # the fixture model's 192-wide layers tile by 64; one decode scan (compile time)
        opts = KernelConfig(gemm=gemm, attention=attention, add_norm=add_norm, gemv_block_n=64, gemv_block_k=64,
                            first_choice_scan=False)
        return adsa_jax.generate(adsa_jax.Model(c2i.config, p), labels, jax.random.key(1),
                                 sampling=adsa_jax.SamplingConfig(top_k=1), policy=pol, options=opts)

    step = str(jax.make_jaxpr(lambda p: run(p, "pallas-interpret"))(c2i.params))
    # qkv, wo, w1|w3 (stacked), w2 per layer (and two add_rms_norm) and the head, and the one-kernel step per layer
    cfg = c2i.config
    assert step.count("pallas_call") == (4 + 2 * add_norm + (attention != "xla")) * cfg.n_layer + 1
    toks = run(c2i.params, "pallas-interpret")
    want = run(c2i.params, "xla")
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(want))
    if name == "dense":
        np.testing.assert_array_equal(np.asarray(toks), c2i_ref["greedy_cfg_tokens"])


def test_gemm_choice(c2i):
    """'auto': the GEMV on one GPU for at most gemv_max_rows rows of bf16/fp16 weights, XLA
    elsewhere; forcing it where it cannot run is a clear error."""
    cfg = c2i.config
    bf16, f32 = jnp.bfloat16, jnp.float32

    def gemm(requested, rows, dtype, backend="gpu", mesh=None, **kw):
        return kernel_config(cfg, None, rows, dtype, base=KernelConfig(gemm=requested, **kw), backend=backend,
                             pallas=True, mesh=mesh).gemm

    assert gemm("auto", 2, bf16, backend="cpu") == "xla"  # not a GPU
    with pytest.raises(ConfigError, match="compiles for a GPU"):
        gemm("pallas", 2, bf16, backend="cpu")
    assert gemm("auto", 2, bf16) == "pallas"
    assert gemm("auto", 16, jnp.float16) == "pallas"
    assert gemm("auto", 18, bf16) == "xla"
    assert gemm("auto", 2, f32) == "xla"
    assert gemm("auto", 2, bf16, mesh=object()) == "xla"
    assert gemm("xla", 2, bf16) == "xla" and gemm("pallas", 2, f32) == "pallas"
    assert gemm("auto", 2, bf16, gemv_max_rows=0) == "xla"
    for args, kw, msg in ((("pallas", 32, bf16), {}, "at most 16 rows"),
                          (("pallas-interpret", 2, bf16), {"mesh": object()}, "on a mesh")):
        with pytest.raises(ConfigError, match=msg):
            gemm(*args, **kw)
    with pytest.raises(ConfigError, match="gemm must be"):
        KernelConfig(gemm="cublas")
    with pytest.raises(ConfigError, match="gemm must be"):
        adsa_jax.generate(c2i, np.array([1]), jax.random.key(0), options=KernelConfig(gemm="fast"))


@pytest.mark.parametrize("gran,kw,segments", [("head", dict(prefix=5, keep=7, local=6, period=3), 3),
                                              ("layer", dict(prefix=4, keep=9, local=1, period=4), 1)])
def test_leave_score_in_kernel_gives_the_xla_tokens(gran, kw, segments):
    """Period s > 1 on the static schedule: the step before each leaving step scores the leaving
    step's candidates in its kernel (the cache carries the terms) and generation gives the tokens
    of the XLA path, also with length segments that cut the blocks. local = 1: the step before
    writes one of the leaving tokens itself."""
    cfg = adsa_jax.GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=36)
    model = adsa_jax.Model(cfg, init_params(cfg, jax.random.key(3), jnp.float32))
    pol = make_policy(cfg, "adsa-evict", granularity=gran, **kw)
    kern = on_kernels(pol, segments=segments)
    assert kern.fused_leave_score and "dots" in kern.init(6, 2, 32, jnp.float32)
    assert "dots" not in on_kernels(pol, leave_score_in_kernel=False).init(6, 2, 32, jnp.float32)

    def run(kernels):
        return np.asarray(adsa_jax.generate(model, jnp.arange(3) % 5, jax.random.key(1), policy=pol, options=kernels,
                                            sampling=SamplingConfig(top_k=0)))
    want = run(KernelConfig(attention="xla", gemm="xla", kth="sort", cublas=False))
    np.testing.assert_array_equal(run(kern.kernels), want)


def test_leaving_step_ignores_score_terms_no_kernel_computed():
    """A cache that carries score terms (init saw enough rows for the window's kernel) but whose
    rows here do not run that kernel (a device of a mesh sees fewer): the leaving step scores V
    in XLA, never the carried terms."""
    cfg = adsa_jax.GPTConfig(dim=64, n_layer=1, n_head=2, vocab_size=64, num_classes=5, block_size=36)
    pol = on_kernels(make_policy(cfg, "adsa-evict", prefix=2, keep=4, local=3, period=2),
                     one_kernel_min_row_heads=8, one_kernel_max_slots=1)
    assert pol.fused_leave_score and "dots" in pol.init(4, 2, 8, jnp.float32)  # 4 rows x 2 heads: the kernel
    rng = np.random.default_rng(0)
    cache = pol.init(2, 2, 8, jnp.float32)  # ... 2 rows: not
    cache = {**cache, "v": jnp.asarray(rng.normal(size=cache["v"].shape), jnp.float32),
             "pos": jnp.broadcast_to(jnp.arange(pol.slots, dtype=jnp.int32), cache["pos"].shape)}
    t = pol.leave_schedule[0]  # the first leaving step
    assert "dots" not in cache
    want = pol.begin_step([cache], t, leave=True)[0]
    terms = jnp.full(cache["pos"].shape, 7.0, jnp.float32)  # (B, H, S) as the kernel would write them
    got = pol.begin_step([{**cache, "dots": terms, "sq": terms}], t, leave=True)[0]
    for key in ("k", "v", "pos", "vsum"):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


@pytest.mark.parametrize("gran,segments", [("head", 3), ("layer", 3)])
def test_first_choice_scan_gives_the_xla_tokens(gran, segments):
    """Period 1 on the kernel path: the steps before the first choice (first_choice = P + M + K - 1,
    the step before the pool fills) run as a scan of their own whose step kernel has no victim
    score (and, at layer granularity, that skips every layer's choice), the steps from it as
    another whose kernel always scores; generation gives the XLA path's tokens, also when length
    segments cut the call (here one segment ends before the first choice, another spans it). Off,
    the call is one scan fewer. (A ring of one slot: test_kernel_in_generation_matches_xla.)"""
    cfg = adsa_jax.GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=36)
    model = adsa_jax.Model(cfg, init_params(cfg, jax.random.key(3), jnp.float32))
    pol = make_policy(cfg, "adsa-evict", granularity=gran, prefix=4, keep=9, local=3)
    sw = dict(segments=segments, one_kernel_min_row_heads=8, one_kernel_max_slots=1)  # head: one kernel from 4 rows x 2 heads
    kern = on_kernels(pol, **sw)
    assert kern.first_choice(6, 2) == pol.prefix + pol.local + pol.keep - 1
    assert on_kernels(pol, **sw, first_choice_scan=False).first_choice(6, 2) is None
    assert on_kernels(pol, **sw).first_choice(2, 2) is None  # 2 rows x 2 heads: no step kernel

    def run(kernels):
        return np.asarray(adsa_jax.generate(model, jnp.arange(3) % 5, jax.random.key(1), policy=pol, options=kernels,
                                            sampling=SamplingConfig(top_k=0)))
    want = run(KernelConfig(attention="xla", gemm="xla", kth="sort", cublas=False))
    np.testing.assert_array_equal(run(kern.kernels), want)

    def scans(**more):
        """(the decode scans, the loops in each distinct step kernel's program)."""
        from adsa_jax.generate import _generate_jit, _scalars, prepare_condition
        kc = dataclasses.replace(INTERPRET, **sw, **more)
        cond, mask = prepare_condition(cfg, np.arange(3) % 5)
        jaxpr = _generate_jit.trace(model.params, cond, mask, jax.random.key(1), jnp.arange(3),
                                    _scalars(SamplingConfig(top_k=0)), cfg=cfg, policy=with_kernels(pol, kc),
                                    use_cfg=True, kernels=kc, top_p_on=False).jaxpr
        kernels = set()

        def walk(jp):
            for eqn in jp.eqns:
                if eqn.primitive.name == "pallas_call" and eqn.params["name"] == "adsa_evict_step":
                    kernels.add(str(eqn.params["jaxpr"]))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr)
        return (sum(eqn.primitive.name == "scan" for eqn in jaxpr.eqns),
                sorted(k.count(" while[") for k in kernels))
    n_on, loops_on = scans()
    n_off, loops_off = scans(first_choice_scan=False)
    # on: one scan more, and each step kernel compiled with one loop (without the score, or with it)
    assert n_on == n_off + 1 and loops_off == [2] and loops_on == [1, 1]


@pytest.mark.parametrize("local", [3, 1])
def test_layer_choice_kernel_equals_xla(local):
    """kernels.layer_choice (interpreted) against Evict._layer_choice's XLA form on every layer's
    terms: the same first maxima (ties included: equal scores by the lowest candidate; o's ring
    slot after the pool) and the same four norm lanes, bit for bit, at steps that put o and next
    step's leaving token in each ring slot, also with no choice (choose=False) and, with a ring
    of one, the new token's lane."""
    cfg = adsa_jax.GPTConfig(dim=64, n_layer=3, n_head=4, vocab_size=64, num_classes=5, block_size=36)
    pol = make_policy(cfg, "adsa-evict", granularity="layer", prefix=3, keep=6, local=local)
    on, off = on_kernels(pol), on_kernels(pol, layer_choice_in_kernel=False)
    rng = np.random.default_rng(0)
    b, h, d, s = 5, 4, 16, pol.slots

    def terms():  # few distinct values: ties between candidates, and between a pool slot and o
        return jnp.asarray(rng.integers(0, 4, size=(b, h, s)) * 0.25 + 0.5, jnp.float32)
    caches = [{"sq": terms(), "dots": terms() - 1.0, "v": jnp.zeros((b, h, s, d), jnp.float32)} for _ in range(3)]
    v_new = jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32)
    seen = set()
    for t in range(pol.prefix + 2 * local + 2):  # from the prefix steps (t < P) on
        for choose in (True, False):
            got, want = (p._layer_choice(caches, jnp.int32(t), v_new, choose=choose) for p in (on, off))
            np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
            np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
            seen.update(np.asarray(want[0]).ravel().tolist() if choose else [])
    assert len(seen) > 2 and min(seen) < pol.keep <= max(seen) < pol.keep + local  # pool slots and o itself
    assert str(jax.make_jaxpr(lambda c: on._layer_choice(c, jnp.int32(5), v_new))(caches)).count("pallas_call") == 1
    assert "pallas_call" not in str(jax.make_jaxpr(lambda c: off._layer_choice(c, jnp.int32(5), v_new))(caches))


def test_widen_by_bits_is_astype():
    """kernels.common.widen(by_bits=True): a bf16 array's float32 values by its bits, bit for bit
    astype's (every bf16 pattern: zeros, subnormals, infinities, NaNs); other dtypes are astype."""
    from adsa_jax.kernels.common import widen

    every = jax.lax.bitcast_convert_type(jnp.arange(2 ** 16, dtype=jnp.uint32).astype(jnp.uint16), jnp.bfloat16)
    as_bits = lambda x: np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint32))  # noqa: E731
    np.testing.assert_array_equal(as_bits(widen(every, True)), as_bits(every.astype(jnp.float32)))
    x = jnp.asarray([1.5, -2.0], jnp.float16)
    assert widen(x, True).dtype == jnp.float32 and np.asarray(widen(x, True)).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("switch,form", [("widen_by_bits", f) for f in ("adsa-evict", "window-score", "dense", "attention")]
                         + [("score_widens_apart", "adsa-evict")])
def test_widen_switches_keep_every_output(switch, form):
    """KernelConfig.widen_by_bits and score_widens_apart: the step kernels (bf16 caches) give
    bit-equal outputs with the switch on and off; widen_by_bits on, the kernel widens by a bitcast,
    and score_widens_apart on, the victim score widens V by astype on its own (more converts)."""
    from adsa_jax.kernels import evict_step

    b, h, d, c, P, K, M = 2, 2, 16, 1, 2, 12, 3
    s = c + P + K + M
    rng = np.random.default_rng(3)
    bf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)  # noqa: E731
    k, v = bf(b, h, s, d), bf(b, h, s, d)
    q, kn, vn = bf(b, h, d), bf(b, h, d), bf(b, h, d)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, h, s))
    t = P + M + K + 3  # the pool is full: adsa-evict scores
    ws, n_moved = c + P + K + (t - P) % M, t - P - M
    scalars = (ws, ws, 1, int(n_moved >= K), min(n_moved, K - 1), c + P + K + (t + 1 - P) % M, c + t)
    ok = jnp.ones((b, s), bool)

    def run(on):
        cfg = KernelConfig(**{switch: on})
        if form == "adsa-evict":
            vnorm = jnp.maximum(jnp.linalg.norm(v.astype(jnp.float32), axis=-1), 1e-6)
            fn = lambda q: evict_step(q, kn, vn, k, v, pos, ok, scalars, c=c, prefix=P, keep=K,  # noqa: E731
                                      vsum=jnp.ones((b, h, d), jnp.float32),
                                      victim=jnp.full((b, h), 5, jnp.int32), vnorm=vnorm, block_k=4,
                                      config=cfg, interpret=True)
        elif form == "window-score":
            fn = lambda q: evict_step(q, kn, vn, k, v, pos, ok, scalars, c=c, prefix=P, keep=0,  # noqa: E731
                                      score_vec=jnp.ones((b, h, d), jnp.float32), block_k=4, config=cfg,
                                      interpret=True)
        elif form == "dense":
            fn = lambda q: evict_step(q, kn, vn, k, v, None, ok, (10, 10, 0, 0, 0, 11, 10), c=c,  # noqa: E731
                                      prefix=0, keep=0, block_k=4, config=cfg, interpret=True)
        else:
            fn = lambda q: decode_attention(q, k, v, jnp.ones((b, 1, s), bool), 13,  # noqa: E731
                                            score_vec=jnp.ones((b, h, d), jnp.float32), block_k=4, config=cfg,
                                            interpret=True)
        jaxpr = jax.make_jaxpr(fn)(q)
        body = str(next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call").params["jaxpr"])
        return jax.tree.leaves(fn(q)), body

    (on, body_on), (off, body_off) = run(True), run(False)
    if switch == "widen_by_bits":
        assert "bitcast_convert_type" in body_on and "bitcast_convert_type" not in body_off
    else:
        assert body_on.count("convert_element_type") > body_off.count("convert_element_type")
    for a, z in zip(on, off):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(z))
