"""Policy construction, errors, memory of the compiled call, compile-once, pluggability."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adsa_jax
from adsa_jax.config import GPTConfig
from adsa_jax.generate import Model, _generate_jit, _scalars
from adsa_jax.model import init_params
from adsa_jax.cache import Dense, Evict, Select, kv_bytes, make_policy
from adsa_jax.options import XLA_KERNELS, SamplingConfig

CFG16 = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=256)


def test_default_sizes_from_budget():
    p = make_policy(CFG16, "adsa-evict", budget=0.5)
    assert (p.prefix, p.keep, p.local) == (16, 128 - 48, 32) and p.slots == 1 + 128
    w = make_policy(CFG16, "window", budget=0.5)
    assert (w.prefix, w.keep, w.local) == (16, 0, 112) and w.slots == p.slots
    s = make_policy(CFG16, "adsa-select", budget=0.25, granularity="layer")
    assert isinstance(s, Select) and (s.prefix, s.keep, s.local, s.granularity) == (16, 16, 32, "layer")
    r = make_policy(CFG16, "random", prefix=2, keep=5, local=17)
    assert r.chooser == "random" and r.slots == 1 + 24
    full = make_policy(CFG16, "adsa-evict", budget=1.0)
    assert full.prefix + full.keep + full.local == 256


@pytest.mark.parametrize("kw,msg", [
    (dict(budget=0.1), "fewer than the default prefix"),
    (dict(budget=0.5, local=200), "exceed the budget"),
    (dict(prefix=-1, keep=3, local=20), r"prefix \(--prefix\) must be an integer in \[0, 2147483647\], got -1"),
    (dict(prefix=2, keep=-3, local=20), r"keep \(--keep\) must be an integer in \[0, "),
    (dict(prefix=2, keep=3, local=0), r"local \(--local\) must be an integer in \[1, "),
    (dict(prefix=100, keep=100, local=100), "exceeds the 256 image tokens"),
    (dict(budget=1.5), "fraction in"),
    (dict(budget=0.0), "fraction in"),
    (dict(prefix=2, keep=3), "all three"),
])
def test_budgets_that_cannot_work(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy(CFG16, "adsa-evict", **kw)


def test_unknown_policy_and_dense_budget():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy(CFG16, "lru")
    with pytest.raises(ValueError, match="takes no budget"):
        make_policy(CFG16, "dense", budget=0.5)
    with pytest.raises(ValueError, match="granularity"):
        make_policy(CFG16, "adsa-evict", budget=0.5, granularity="token")


CFG24 = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=576)


@pytest.mark.parametrize("budget,total", [(0.25, 144), (0.44, 253), (256 / 576, 256), (0.5, 288), (0.75, 432)])
def test_every_policy_at_the_lab_budgets(budget, total):
    """24x24 grid: every policy builds at the fidelity lab's budgets with the documented sizes
    (P, K, M) and keeps at most T = round(budget * 576) image tokens (0.44 rounds to 253; 256 of
    576, the paper's ADSA-256, is budget=256/576)."""
    w = 24
    want = {
        "adsa-select": (w, total - 3 * w, 2 * w), "adsa-evict": (w, total - 3 * w, 2 * w),
        "random": (w, total - 3 * w, 2 * w), "random-uniform": (w, total - 3 * w, 2 * w),
        "adsa-evict-all": (0, total - 1, 1), "window": (w, 0, total - w),
        "line": (w, 0, (total - w) // w * w), "h2o": (0, total - 2 * w, 2 * w),
    }
    for name, sizes in want.items():
        for gran in ("head", "layer"):
            p = make_policy(CFG24, name, budget=budget, granularity=gran)
            assert (p.prefix, p.keep, p.local) == sizes, (name, budget)
            if name != "adsa-select":
                assert p.slots == 1 + sum(sizes) <= 1 + total
    assert make_policy(CFG24, "random-uniform", budget=budget).draw == "reservoir"
    ev = make_policy(CFG24, "adsa-evict", budget=budget, period=8)
    assert ev.period == 8 and ev.slots == 1 + total + 7  # the ring grows by s - 1 slots


def test_budget_and_sizes_of_the_wrong_type_are_refused():
    """make_policy checks types before any arithmetic (a string budget ended in a bare TypeError, and
    True was taken as budget 1); a whole float size is its integer."""
    for bad in (True, "0.5", b"0.5"):
        with pytest.raises(ValueError,
                           match=r"budget \(--budget\) must be a number, a fraction in \(0, 1\] of the 256 image tokens"):
            make_policy(CFG16, "adsa-evict", budget=bad)
    with pytest.raises(ValueError, match=r"keep \(--keep\) must be an integer in \[0, "):
        make_policy(CFG16, "adsa-evict", prefix=16, keep="3", local=32)
    with pytest.raises(ValueError, match=r"prefix \(--prefix\) must be an integer in \[0, "):
        make_policy(CFG16, "adsa-evict", prefix=2.5, keep=3, local=32)
    p = make_policy(CFG16, "adsa-evict", prefix=16.0, keep=np.int64(3), local=32)
    assert (p.prefix, p.keep, p.local) == (16, 3, 32) and type(p.prefix) is int and type(p.keep) is int
    assert make_policy(CFG16, "adsa-evict", budget=np.float32(0.5)) == make_policy(CFG16, "adsa-evict", budget=0.5)


def test_period_and_the_new_policies_refuse_bad_options():
    with pytest.raises(ValueError, match=r"^period \(--period\) must be an integer >= 1 .*got 0$"):
        make_policy(CFG16, "adsa-evict", budget=0.5, period=0)
    with pytest.raises(ValueError, match=r"period \(--period\) must be an integer >= 1 .*got 2.0$"):
        make_policy(CFG16, "adsa-evict", budget=0.5, period=2.0)
    with pytest.raises(ValueError, match=r"period \(--period\) must be an integer >= 1 .*got True$"):
        make_policy(CFG16, "adsa-evict", budget=0.5, period=True)
    # a NumPy integer is an integer: the policy holds it as a Python int (hashable, static under jit)
    assert make_policy(CFG16, "adsa-evict", budget=0.5, period=np.int64(3)).period == 3
    assert type(make_policy(CFG16, "adsa-evict", budget=0.5, period=np.int64(3)).period) is int
    for name in ("window", "line", "h2o", "random-uniform", "adsa-select", "dense"):
        with pytest.raises(ValueError, match="period applies to"):
            make_policy(CFG16, name, period=2)
    with pytest.raises(ValueError, match="protects no prefix or local window"):
        make_policy(CFG16, "adsa-evict-all", budget=0.5, local=4)
    with pytest.raises(ValueError, match="budget= or keep=, not both"):
        make_policy(CFG16, "adsa-evict-all", budget=0.5, keep=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        make_policy(CFG16, "line", prefix=16, local=40)
    with pytest.raises(ValueError, match="no pool"):
        make_policy(CFG16, "line", budget=0.5, keep=3)
    with pytest.raises(ValueError, match="fewer than the line policy's anchors"):
        make_policy(CFG16, "line", budget=0.1)
    with pytest.raises(ValueError, match="h2o's default recent window"):
        make_policy(CFG16, "h2o", budget=0.1)
    assert make_policy(CFG16, "adsa-evict-all", keep=3).slots == 1 + 4
    # a period whose ring holds every token the budget evicts (256 tokens, budget 0.5: P 16, K 80, M 32;
    # from s = 208 the ring of 239 slots never fills in the 238 steps past the prefix): refused
    with pytest.raises(ValueError, match="period 208: .* none would ever be evicted; use period <= 207"):
        make_policy(CFG16, "adsa-evict", budget=0.5, period=208)
    assert make_policy(CFG16, "adsa-evict", budget=0.5, period=207).attended(254) < 1 + 255  # evicts, once
    assert make_policy(CFG16, "random", budget=1.0, period=300).slots == 1 + 256 + 299  # budget 1: dense at any s


def test_every_policy_cache_has_sharding_axes():
    """Every cache entry of every policy has logical axes (sharding.CACHE_AXES), so generate can
    place it on a mesh."""
    from adsa_jax import sharding

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    for name in adsa_jax.POLICY_NAMES:
        for gran in ("head", "layer"):
            pol = make_policy(CFG16, name, granularity=gran) if name != "dense" else make_policy(CFG16, name)
            cache = pol.init(2, CFG16.n_head, CFG16.head_dim, jnp.float32)
            specs = sharding.cache_specs(cache, mesh, pol)
            assert set(specs) == set(cache), name


def _compiled(model, policy, batch):
    args = (model.params, jnp.arange(batch, dtype=jnp.int32) % 5, jnp.ones((batch, 1), bool), jax.random.key(0),
            jnp.arange(batch, dtype=jnp.int32), _scalars(SamplingConfig(top_k=0)))
    c = _generate_jit.lower(*args, cfg=model.config, policy=policy, use_cfg=True, kernels=XLA_KERNELS).compile()
    m = c.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes, c.as_text()


def test_evict_never_allocates_the_dense_cache():
    # 24x24 grid (576 image tokens), batch 8 with CFG (16 rows): evict's cache has c + P + K + M slots.
    # float32, because XLA:CPU upcasts bf16 dot operands to f32 copies, which would blur the accounting.
    cfg = GPTConfig(dim=128, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=576)
    model = Model(cfg, init_params(cfg, jax.random.key(0), jnp.float32))
    dense, evict = make_policy(cfg, "dense"), make_policy(cfg, "adsa-evict", budget=0.5)
    dense_kv, evict_kv = kv_bytes(dense, cfg, 16, jnp.float32), kv_bytes(evict, cfg, 16, jnp.float32)
    assert evict_kv <= 0.51 * dense_kv
    dense_mem, dense_hlo = _compiled(model, dense, 8)
    evict_mem, evict_hlo = _compiled(model, evict, 8)
    dense_shape = f"f32[16,2,{dense.slots},64]"
    assert dense_shape in dense_hlo and dense_mem >= dense_kv  # the checks do see the dense cache
    # No buffer of the dense cache's shape, or with as many slots, anywhere in the evict program.
    assert dense_shape not in evict_hlo and f",{dense.slots}," not in evict_hlo
    # Compiled memory: the evict cache plus, on XLA:CPU only, one copy of it that CPU buffer
    # assignment keeps around the in-place pool scatter (the GPU compile does not: BENCHMARKS.md,
    # 0.54x of dense's peak at GPT-XL 384 px, batch 256), plus the per-call w1|w3 stack
    # (KernelConfig.stack_ffn), which dense holds too.
    w13 = sum(layer["w1"].nbytes + layer["w3"].nbytes for layer in model.params["layers"]) if XLA_KERNELS.stack_ffn else 0
    assert evict_mem <= 0.55 * dense_kv + evict_kv + w13, (evict_mem, dense_kv, evict_kv, w13)


def test_policies_compile_once(c2i):
    pol = make_policy(c2i.config, "adsa-evict", prefix=2, keep=6, local=9)
    adsa_jax.generate(c2i, np.array([1, 2]), jax.random.key(0), policy=pol).block_until_ready()
    n = _generate_jit._cache_size()
    same = make_policy(c2i.config, "adsa-evict", prefix=2, keep=6, local=9)  # equal, not the same object
    sampling = adsa_jax.SamplingConfig(cfg_scale=2.0, temperature=0.5)
    adsa_jax.generate(c2i, np.array([3, 4]), jax.random.key(7), sampling=sampling, policy=same).block_until_ready()
    assert _generate_jit._cache_size() == n


@dataclasses.dataclass(frozen=True)
class SinksOnly(Evict):
    """A policy written outside the library: condition + prefix + a ring, by reusing Evict."""
    name: str = "sinks-only"


def test_a_new_policy_plugs_in(c2i, c2i_ref):
    cfg = c2i.config
    custom = SinksOnly(cfg.cls_token_num, cfg.num_image_tokens, prefix=4, keep=0, local=12)
    window = make_policy(cfg, "window", prefix=4, keep=0, local=12)
    a = adsa_jax.score(c2i, c2i_ref["labels"], c2i_ref["tokens"], policy=custom)
    b = adsa_jax.score(c2i, c2i_ref["labels"], c2i_ref["tokens"], policy=window)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(make_policy(cfg, "dense"), Dense)


@pytest.mark.parametrize("kw", [dict(period=3), dict(period=4, granularity="layer")])
def test_period_blocks_equal_the_branch(kw):
    """Period s > 1: the decode cut into blocks of s steps led by the leaving step (no branch) gives
    exactly the tokens of one lax.cond a step, here in length segments that cut the blocks (score()
    takes the blocks too: the float64 reference tests check it at every period)."""
    model = Model(CFG16, init_params(CFG16, jax.random.key(3), jnp.float32))
    pol = make_policy(CFG16, "adsa-evict", prefix=5, keep=7, local=6, **kw)
    labels = jnp.arange(3) % CFG16.num_classes
    samp = SamplingConfig(top_k=0)
    off = dataclasses.replace(XLA_KERNELS, period_blocks=False)
    want = adsa_jax.generate(model, labels, jax.random.key(1), sampling=samp, policy=pol, options=off)
    on = dataclasses.replace(XLA_KERNELS, segments=3)
    got = adsa_jax.generate(model, labels, jax.random.key(1), sampling=samp, policy=pol, options=on)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
