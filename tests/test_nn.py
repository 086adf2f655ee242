"""adsa_jax.nn: the NNX modules hold the functional params (same arrays, shapes, dtypes, logical
axes), compute adsa_jax.forward's logits, feed generate, and fine-tune with nnx.Optimizer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import adsa_jax
from adsa_jax import demo
from adsa_jax import model as M
from adsa_jax import nn
from adsa_jax import sharding as S
from adsa_jax.config import ConfigError, GPTConfig
from adsa_jax.vq import VQConfig, VQModel, decode_codes, encode_images, vq_param_shapes

ROOT = Path(__file__).resolve().parents[1]
C2I = GPTConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=64, num_classes=10, block_size=16)
T2I = GPTConfig(dim=32, n_layer=1, n_head=2, multiple_of=32, vocab_size=64, model_type="t2i", caption_dim=8,
                cls_token_num=120, block_size=16)


def flat_variables(tree):
    """{path tuple: leaf} of an nnx State (leaves are Variables)."""
    return {tuple(p): v for p, v in nnx.to_flat_state(tree)}


def flat_params(params):
    """{path tuple: leaf} of a functional params pytree, in nnx's path spelling (names, list indices)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, tuple))[0]:
        out[tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)] = leaf
    return out


def random_params(shapes, seed=0):
    """numpy weights for a shape tree (normal(0, 0.02), norm scales 1): wrapping needs no compile."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s, np.float32) if "norm" in jax.tree_util.keystr(p)
        else (0.02 * rng.standard_normal(s)).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def strip(spec):
    """A PartitionSpec without trailing Nones (``adsa_jax.sharding`` writes them that way)."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


@pytest.fixture(scope="module")
def demo_model():
    return demo.load_demo_model(dtype="float32")


@pytest.mark.parametrize("cfg", [C2I, T2I], ids=["c2i", "t2i"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_params_have_the_functional_shapes_and_dtypes(cfg, dtype):
    # abstract: the same constructor under nnx.eval_shape, no weights drawn (test_generate draws them)
    gpt = nnx.eval_shape(lambda: nn.GPT(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    want = flat_params(M.abstract_params(cfg, dtype))
    got = {p: (v.shape, v.dtype) for p, v in flat_variables(nnx.state(gpt)).items()}
    assert got == {p: (a.shape, a.dtype) for p, a in want.items()}
    # the t2i null caption is a buffer, as in LlamaGen: stored, not trained
    trained = set(flat_variables(nnx.state(gpt, nnx.Param)))
    assert set(want) - trained == ({("caption", "uncond")} if cfg.model_type == "t2i" else set())
    if cfg.model_type == "t2i":
        assert isinstance(gpt.caption["uncond"], nn.Buffer)


def buffer_address(x):
    return x.unsafe_buffer_pointer() if isinstance(x, jax.Array) else x.__array_interface__["data"][0]


@pytest.mark.parametrize("on_device", [False, True], ids=["as-loaded", "jax-arrays"])
def test_from_model_wraps_the_loaded_arrays_without_copying(demo_model, on_device):
    # as loaded, Orbax gives numpy arrays; jax.device_put makes them jax.Arrays: neither is copied
    model = jax.device_put(demo_model) if on_device else demo_model
    gpt = nn.GPT.from_model(model)
    src = flat_params(model.params)
    assert all(isinstance(a, jax.Array) == on_device for a in src.values())
    held = {p: v.get_value() for p, v in flat_variables(nnx.state(gpt)).items()}
    assert held.keys() == src.keys()
    for p, arr in src.items():
        assert held[p] is arr, p
        assert buffer_address(held[p]) == buffer_address(arr), p
    back = gpt.to_model()
    assert back.config == model.config
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params)):
        assert a is b


@pytest.mark.parametrize("cfg", [C2I, T2I], ids=["c2i", "t2i"])
def test_call_is_adsa_jax_forward_on_the_current_arrays(cfg):
    model = adsa_jax.Model(cfg, jax.device_put(random_params(M.param_shapes(cfg), seed=1)))  # jax arrays
    gpt = nn.GPT.from_model(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, cfg.num_image_tokens)).astype(np.int32)
    if cfg.model_type == "c2i":
        cond, mask = np.array([3, 7], np.int32), None
    else:
        cond = rng.normal(size=(2, 120, cfg.caption_dim)).astype(np.float32)
        mask = np.zeros((2, 120), bool)
        mask[0, -5:], mask[1, -9:] = True, True  # left-padded captions of 5 and 9 tokens
    want = np.asarray(adsa_jax.forward(model, cond, tokens, cond_mask=mask))
    got = np.asarray(gpt(cond, tokens, cond_mask=mask))
    assert got.shape == (2, cfg.num_image_tokens, cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(adsa_jax.forward(gpt, cond, tokens, cond_mask=mask)), got)
    # the module is a live view: a changed variable changes the logits (the head's output weight
    # at zero gives zero logits everywhere); the wrapped Model keeps its own (immutable) arrays
    gpt.output[...] = jnp.zeros_like(gpt.output[...])
    assert not np.asarray(gpt(cond, tokens, cond_mask=mask)).any()
    assert np.asarray(adsa_jax.forward(model, cond, tokens, cond_mask=mask)).any()


@pytest.mark.parametrize("cfg", [C2I, T2I], ids=["c2i", "t2i"])
def test_partition_specs_are_the_sharding_modules(cfg):
    gpt = nn.GPT.from_model(adsa_jax.Model(cfg, random_params(M.param_shapes(cfg))))
    state = nnx.state(gpt)
    specs = {p: v.get_value() for p, v in flat_variables(nnx.get_partition_spec(state)).items()}
    mesh = S.make_mesh(data=1, model=1)
    want = flat_params(S.param_shardings(cfg, mesh, tensor_parallel=True))
    assert specs.keys() == want.keys()
    for p, sh in want.items():
        assert strip(specs[p]) == strip(sh.spec), p  # the same mesh axis for every dimension
    assert specs[("layers", 0, "wqkv")] == jax.sharding.PartitionSpec(None, None, S.MODEL, None)
    assert specs[("layers", 0, "w2")] == jax.sharding.PartitionSpec(S.MODEL, None)
    # placing the state with flax's own helper puts the params on the mesh as adsa_jax expects
    placed = jax.device_put(state, nnx.get_named_sharding(state, mesh))
    nnx.update(gpt, placed)
    assert S.on_mesh(gpt.to_model().params, mesh)


def test_generate_takes_the_module():
    gpt = nn.GPT(C2I, rngs=nnx.Rngs(2))
    ref = M.init_params(C2I, nnx.Rngs(2).params(), jnp.float32)  # the constructor draws init_params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gpt.to_model().params), jax.tree.leaves(ref)))
    cond, key = np.array([1, 4], np.int32), jax.random.key(5)
    a = np.asarray(adsa_jax.generate(gpt, cond, key))
    b = np.asarray(adsa_jax.generate(gpt.to_model(), cond, key))
    assert a.shape == (2, C2I.num_image_tokens)
    np.testing.assert_array_equal(a, b)


def test_bad_construction_is_one_clear_error():
    with pytest.raises(ConfigError, match="rngs"):
        nn.GPT(C2I)
    with pytest.raises(ConfigError, match="adsa_jax.Model"):
        nn.GPT.from_model({"config": C2I})
    params = random_params(M.param_shapes(C2I))
    params["layers"][1]["w2"] = params["layers"][1]["w2"][:, :16]
    with pytest.raises(ConfigError, match=r"\['layers'\]\[1\]\['w2'\] has shape \(96, 16\)"):
        nn.GPT(C2I, params=params)


def test_vq_module_wraps_decodes_and_encodes():
    cfg = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1)
    abstract = nnx.eval_shape(lambda: nn.VQ(cfg, rngs=nnx.Rngs(0)))  # the constructor, no weights drawn
    assert jax.tree.map(lambda x: x.shape, abstract.to_model().params) == vq_param_shapes(cfg)
    vq = VQModel(cfg, random_params(vq_param_shapes(cfg)))
    mod = nn.VQ.from_model(vq)
    for a, b in zip(jax.tree.leaves(mod.to_model().params), jax.tree.leaves(vq.params)):
        assert a is b
    codes = np.random.default_rng(0).integers(0, 32, (2, 16)).astype(np.int32)
    want = np.asarray(decode_codes(vq, codes))
    got = np.asarray(mod(codes))
    assert got.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(got, want)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(mod.encode(images)), np.asarray(encode_images(vq, images)))
    assert all(s == jax.sharding.PartitionSpec() for s in jax.tree.leaves(nnx.get_partition_spec(nnx.state(mod))))


def test_finetune_example_lowers_the_loss(demo_model):
    """examples/finetune_nnx.py, shortened: 3 AdamW steps of 4 images on the bundled model."""
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("finetune_nnx", ROOT / "examples" / "finetune_nnx.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    gpt = nn.GPT.from_model(demo_model)
    out = ex.finetune(gpt, demo.load_data(), task="invert", steps=3, batch=4, warmup=1, eval_every=3,
                      eval_images=16, log=lambda s: None)
    (s0, before), (s1, after) = out["heldout"]
    assert (s0, s1) == (0, 3)
    assert after < before - 0.1, out["heldout"]  # measured 1.616 -> 1.206 nats/token
    assert len(out["train"]) == 3 and all(np.isfinite(out["train"]))
    # the optimizer replaced the module's arrays; the loaded model it wraps keeps its own
    tuned = gpt.to_model().params["output"]
    assert tuned is not demo_model.params["output"]
    assert not np.array_equal(np.asarray(tuned), np.asarray(demo_model.params["output"]))
