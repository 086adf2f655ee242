"""Generation mechanics: compile once, per-example randomness, cached == full forward, sizes."""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adsa_jax
from adsa_jax.config import ConfigError, GPTConfig, named_config
from adsa_jax.generate import Model, _generate_jit
from adsa_jax.options import KernelConfig, SamplingConfig, kernel_config
from adsa_jax.model import count_params, init_params

C2I_COUNTS = {"GPT-B": 110_888_448, "GPT-L": 342_910_976, "GPT-XL": 774_699_520, "GPT-XXL": 1_410_972_672,
              "GPT-XXXL": 3_893_027_840, "GPT-1B": 1_199_616_000, "GPT-3B": 3_096_659_200, "GPT-7B": 6_614_589_440}
T2I_COUNTS = {"GPT-B": 112_282_368, "GPT-L": 345_031_680, "GPT-XL": 777_678_080, "GPT-XXL": 1_414_940_160,
              "GPT-XXXL": 3_902_261_760, "GPT-1B": 1_205_954_560, "GPT-3B": 3_110_249_600, "GPT-7B": 6_635_655_168}


@pytest.mark.parametrize("name", list(C2I_COUNTS))
def test_named_sizes_parameter_counts(name):
    for kind, table in (("c2i", C2I_COUNTS), ("t2i", T2I_COUNTS)):
        cfg = named_config(name, image_size=256, model_type=kind)
        # Counted from jax.eval_shape of the initialiser: nothing is allocated.
        shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        buffers = cfg.cls_token_num * cfg.caption_dim if kind == "t2i" else 0  # t2i null caption is a buffer
        assert n - buffers == table[name] == count_params(cfg), (name, kind)


def _tiny(model_type="c2i", **kw):
    cfg = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=36,
                    model_type=model_type, cls_token_num=120 if model_type == "t2i" else 1, caption_dim=16, **kw)
    return Model(cfg, init_params(cfg, jax.random.key(3), jnp.float32, std=0.3))


def test_full_forward_equals_prefill_plus_scan():
    m = _tiny()
    labels = np.array([0, 4, 2])
    toks = np.asarray(jax.random.randint(jax.random.key(1), (3, 36), 0, 64))
    np.testing.assert_allclose(np.asarray(adsa_jax.forward(m, labels, toks)),
                               np.asarray(adsa_jax.score(m, labels, toks)), atol=1e-4, rtol=1e-4)
    t = _tiny("t2i")
    emb = np.asarray(jax.random.normal(jax.random.key(2), (2, 120, 16)))
    mask = np.zeros((2, 120), np.int32)
    mask[0, -5:] = 1
    mask[1, -50:] = 1
    emb = emb * mask[..., None]
    np.testing.assert_allclose(np.asarray(adsa_jax.forward(t, emb, toks[:2], cond_mask=mask)),
                               np.asarray(adsa_jax.score(t, emb, toks[:2], cond_mask=mask)), atol=1e-4, rtol=1e-4)


def test_length_buckets_do_not_change_tokens(c2i, c2i_ref):
    a = adsa_jax.generate(c2i, c2i_ref["labels"], jax.random.key(5), sampling=adsa_jax.SamplingConfig(top_k=50))
    b = adsa_jax.generate(c2i, c2i_ref["labels"], jax.random.key(5), sampling=adsa_jax.SamplingConfig(top_k=50),
                          options=KernelConfig(segments=4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_second_call_does_not_recompile(c2i):
    labels = np.array([1, 2])

    def run(cond, seed, **sampling):
        adsa_jax.generate(c2i, cond, jax.random.key(seed), sampling=SamplingConfig(**sampling)).block_until_ready()

    run(labels, 0, cfg_scale=4.0, top_p=0.95)
    n = _generate_jit._cache_size()
    # New key, labels, guidance scale, interval, temperature and filters: same shapes, no recompilation.
    run(np.array([7, 3]), 9, cfg_scale=2.5, cfg_interval=10, temperature=0.7, top_k=30, top_p=0.9)
    assert _generate_jit._cache_size() == n
    # top-p off (1.0) is the one other variant (no sort of the logits), compiled once (here, or
    # already by an earlier test).
    run(labels, 1, cfg_scale=4.0)
    m = _generate_jit._cache_size()
    assert m <= n + 1
    run(labels, 2, cfg_scale=3.0, top_k=7)
    assert _generate_jit._cache_size() == m


def test_sampler_without_sort_gives_the_same_tokens(c2i):
    """top-p off and the k-th largest logit from the bitwise-search kernel (what a GPU runs at
    top_p = 1) sample exactly the tokens of the sorted reference filter."""
    from adsa_jax.generate import _scalars, prepare_condition
    from adsa_jax.cache import make_policy

    cfg = c2i.config
    pol = make_policy(cfg, "dense")
    assert kernel_config(cfg, pol, 6, jnp.float32, backend="gpu", pallas=True).kth == "pallas"
    assert kernel_config(cfg, pol, 6, jnp.float32, backend="gpu", pallas=True, mesh=object()).kth == "sort"
    assert kernel_config(cfg, pol, 6, jnp.float32, backend="cpu").kth == "sort"
    cond, mask = prepare_condition(cfg, np.array([1, 5, 9]))
    args = (c2i.params, cond, mask, jax.random.key(4), jnp.arange(3), _scalars(SamplingConfig(top_k=40)))
    kc = kernel_config(cfg, pol, 6, jnp.float32, backend="cpu")
    kw = dict(cfg=cfg, policy=pol, use_cfg=True)
    ref = np.asarray(_generate_jit(*args, **kw, kernels=kc, top_p_on=True))
    got = _generate_jit(*args, **kw, kernels=dataclasses.replace(kc, kth="pallas-interpret"), top_p_on=False)
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_generate_program_choice():
    """cuBLAS GEMM options only for a single GPU from gemm_cublas_min_rows rows."""
    gen = importlib.import_module("adsa_jax.generate")  # the module (adsa_jax.generate is also a function)
    cfg = named_config("GPT-B")

    def program(rows, backend="gpu", **kw):
        return gen.generate_program(kernel_config(cfg, None, rows, jnp.bfloat16, backend=backend, pallas=True, **kw))

    assert program(512, backend="cpu") is gen._generate_jit
    assert program(128) is gen._generate_jit_cublas
    assert program(2) is gen._generate_jit
    assert program(512, mesh=object()) is gen._generate_jit
    assert program(512, base=KernelConfig(gemm_cublas_min_rows=None)) is gen._generate_jit
    assert program(2, base=KernelConfig(cublas=True)) is gen._generate_jit_cublas
    f = jax.jit(lambda x: x @ x, compiler_options=gen.CUBLAS_OPTIONS)  # options this jax/XLA accepts
    np.testing.assert_allclose(np.asarray(f(jnp.eye(3))), np.eye(3))


def test_stacked_ffn_weights_give_the_same_results(c2i, c2i_ref):
    """KernelConfig.stack_ffn (w1 and w3 stacked once per call, one GEMM; the default) gives the
    same sampled tokens and teacher-forced logits as the two separate projections."""
    gen = importlib.import_module("adsa_jax.generate")
    labels = c2i_ref["labels"]
    apart, stacked = KernelConfig(stack_ffn=False), KernelConfig(stack_ffn=True)
    ref_tok = np.asarray(adsa_jax.generate(c2i, labels, jax.random.key(3), sampling=adsa_jax.SamplingConfig(top_k=50),
                                           options=apart))
    ref_log = np.asarray(adsa_jax.score(c2i, labels, ref_tok, options=apart))
    got_tok = adsa_jax.generate(c2i, labels, jax.random.key(3), sampling=adsa_jax.SamplingConfig(top_k=50),
                                options=stacked)
    np.testing.assert_array_equal(np.asarray(got_tok), ref_tok)
    np.testing.assert_allclose(np.asarray(adsa_jax.score(c2i, labels, ref_tok, options=stacked)), ref_log,
                               atol=1e-5, rtol=0)
    layer = gen.M.stack_ffn(c2i.params)["layers"][0]
    np.testing.assert_array_equal(np.asarray(layer["w13"][:, 1]), np.asarray(layer["w3"]))


def test_samples_do_not_depend_on_batch_size_or_position(c2i):
    labels = np.array([3, 1, 4, 1, 5])
    key = jax.random.key(42)
    full = np.asarray(adsa_jax.generate(c2i, labels, key,
                                        sampling=adsa_jax.SamplingConfig(temperature=1.0, top_k=100)))
    assert len({tuple(r) for r in full}) > 1  # really sampling
    part = np.asarray(adsa_jax.generate(c2i, labels[[4, 2]], key, sampling=adsa_jax.SamplingConfig(top_k=100),
                                        example_ids=[4, 2]))
    np.testing.assert_array_equal(part, full[[4, 2]])
    # Different seeds give different images.
    other = np.asarray(adsa_jax.generate(c2i, labels, jax.random.key(43), sampling=adsa_jax.SamplingConfig(top_k=100)))
    assert (other != full).any()


def test_bf16_close_to_fp32(c2i_dir, c2i, c2i_ref):
    m16 = adsa_jax.load(c2i_dir, dtype="bfloat16")
    assert m16.params["tok_embeddings"].dtype == jnp.bfloat16
    ref = np.asarray(adsa_jax.forward(c2i, c2i_ref["labels"], c2i_ref["tokens"]))
    got = np.asarray(adsa_jax.forward(m16, c2i_ref["labels"], c2i_ref["tokens"]))
    assert got.dtype == np.float32
    p = jax.nn.softmax(ref, -1)
    kl = np.asarray(jnp.sum(p * (jax.nn.log_softmax(ref, -1) - jax.nn.log_softmax(got, -1)), -1))
    assert kl.mean() < 0.05 and (ref.argmax(-1) == got.argmax(-1)).mean() > 0.9


def test_bad_generation_inputs(c2i, t2i, t2i_ref):
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="class ids"):
        adsa_jax.generate(c2i, np.array([0, 10]), k)
    # SamplingConfig refuses a bad value when it is built, before anything runs.
    for kw, name in ((dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                     (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
                     (dict(cfg_scale=float("inf")), "cfg_scale"), (dict(cfg_scale=-1.0), "cfg_scale"),
                     (dict(cfg_interval=-2), "cfg_interval")):
        with pytest.raises(ConfigError, match=name):
            SamplingConfig(**kw)
    with pytest.raises(ConfigError, match="sampling must be an adsa_jax.SamplingConfig"):
        adsa_jax.generate(c2i, np.array([0]), k, sampling={"top_k": 5})
    with pytest.raises(ConfigError, match="make_policy"):
        adsa_jax.generate(c2i, np.array([0]), k, policy="adsa-evict")
    # a policy built for another model's sequence (its budget, prefix and ring mean other sizes)
    other = adsa_jax.make_policy(adsa_jax.named_config("GPT-B", image_size=256), "adsa-evict", budget=0.5)
    msg = "built for 256 image tokens after 1 condition slots, but this model has 64 after 1"
    with pytest.raises(ConfigError, match=msg):
        adsa_jax.generate(c2i, np.array([0]), k, policy=other)
    with pytest.raises(ConfigError, match=msg):
        adsa_jax.score(c2i, np.array([0]), np.zeros((1, 64), np.int32), policy=other)
    with pytest.raises(ConfigError, match="after 1 condition slots, but this model has 64 after 120"):
        adsa_jax.generate(t2i, t2i_ref["caption_embs"], k, cond_mask=t2i_ref["emb_masks"],
                          policy=adsa_jax.make_policy(c2i.config, "window", budget=0.5))
    one = jax.devices()[:1]
    for kw, msg in ((dict(data=0), "the data axis must be >= 1, got 0"), (dict(model=0), "axis must be >= 1, got 0"),
                    (dict(data=2), "a 2 x 1 \\(data x model\\) mesh needs 2 devices; 1 are visible")):
        with pytest.raises(ConfigError, match=msg):
            adsa_jax.sharding.make_mesh(devices=one, **kw)
    for bad in (0, np.zeros(2, np.float32), np.zeros((2, 2), np.uint32)):  # a seed, floats, two keys
        with pytest.raises(ConfigError, match="key must be a JAX PRNG key, e.g. jax.random.key"):
            adsa_jax.generate(c2i, np.array([0]), bad)
    with pytest.raises(ConfigError, match="options must be an adsa_jax.KernelConfig"):
        adsa_jax.generate(c2i, np.array([0]), k, options={"attention": "xla"})
    with pytest.raises(ValueError, match="caption features"):
        adsa_jax.generate(t2i, t2i_ref["caption_embs"][:, :100], k, cond_mask=t2i_ref["emb_masks"][:, :100])
    with pytest.raises(ValueError, match="caption mask"):
        adsa_jax.generate(t2i, t2i_ref["caption_embs"], k, cond_mask=t2i_ref["emb_masks"][:1])
    with pytest.raises(ValueError, match="caption mask"):
        adsa_jax.generate(t2i, t2i_ref["caption_embs"], k)
    with pytest.raises(ValueError, match="tokens must have shape"):
        adsa_jax.forward(c2i, np.array([0]), np.zeros((1, 10), np.int32))
    with pytest.raises(ValueError, match="image tokens must be in"):
        adsa_jax.forward(c2i, np.array([0]), np.full((1, 64), 512, np.int32))
    with pytest.raises(ConfigError, match="image tokens must be integer token ids, got dtype float32"):
        adsa_jax.score(c2i, np.array([0]), np.full((1, 64), 1.5, np.float32))
