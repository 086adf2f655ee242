"""Flax NNX modules over the functional model: ``flax.nnx`` training loops, optax, logical sharding.

    from flax import nnx
    from adsa_jax import nn
    gpt = nn.GPT.from_model(adsa_jax.load(ckpt, dtype="float32"))  # wraps the loaded arrays
    logits = gpt(labels, tokens)                   # (B, N, V) float32: adsa_jax.forward
    opt = nnx.Optimizer(gpt, optax.adamw(1e-4), wrt=nnx.Param)
    tokens = adsa_jax.generate(gpt, labels, key)   # generate, score and forward take the module

:class:`GPT` holds the arrays of :class:`adsa_jax.Model`'s params pytree
(:func:`adsa_jax.model.param_shapes`) as ``nnx.Param`` variables in the same tree:
``gpt.tok_embeddings``, ``gpt.layers[i]["wqkv"]``, ``gpt.caption["fc1"]`` (t2i), ... Its call
runs :func:`adsa_jax.forward` on :meth:`GPT.to_model`: there is one model, the functional one,
and the module is a view of its parameters. The t2i null caption (``caption["uncond"]``) is a
:class:`Buffer`, as in LlamaGen (stored, not trained): ``wrt=nnx.Param`` leaves it alone.

Arrays are shared, never copied. An optimizer step gives the variables new arrays (the wrapped
``Model`` keeps its own); an in-place write such as ``gpt.output[...] = x`` into a variable that
holds a numpy array (``adsa_jax.load`` restores numpy arrays when no mesh is given) writes into
that array, as a numpy view would.

Every variable carries its logical axes (``out_sharding``, from :data:`adsa_jax.sharding.PARAM_AXES`)
and the mesh rules (``sharding_rules``, from :data:`adsa_jax.sharding.RULES`), so
``nnx.get_partition_spec(nnx.state(gpt))`` gives the tensor-parallel split of
:func:`adsa_jax.sharding.param_shardings` (heads and FFN hidden on ``model``, the rest
replicated), spelled per axis: ``P(None, None, 'model', None)`` where ``sharding`` writes
``P(None, None, 'model')``, the same sharding. Variables are made with ``eager_sharding=False``:
nothing is placed on a mesh until you do it
(``jax.device_put(state, nnx.get_named_sharding(state, mesh))``, then ``nnx.update``).

:class:`VQ` does the same for the tokenizer (:class:`adsa_jax.VQModel`): ``vq(codes)`` decodes
with :func:`adsa_jax.decode_codes`, ``vq.encode(images)`` encodes. Its weights have no logical
axes (the tokenizer is never split: ``P()`` everywhere).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import model as M
from . import sharding as S
from . import vq as V
from .config import ConfigError, GPTConfig
from .generate import Model, forward

#: logical axis -> mesh axis of the weights' axes, as flax reads ``sharding_rules`` metadata
#: (:data:`adsa_jax.sharding.RULES`, restricted to the axes in :data:`adsa_jax.sharding.PARAM_AXES`)
AXIS_RULES = tuple((a, m) for a, m in S.RULES.items() if any(a in ax for ax in S.PARAM_AXES.values()))

BUFFERS = frozenset({"uncond"})  # stored arrays that LlamaGen keeps as buffers, not parameters


class Buffer(nnx.Variable):
    """A stored array that is not trained (the t2i null caption); outside ``wrt=nnx.Param``."""


def _wrap_tree(tree, axes, path=()):
    """The params pytree (dicts, lists, arrays) as nnx.Dict / nnx.List / variables around the
    same arrays. ``axes``: the same tree of logical-axis tuples, or None (no annotations)."""
    if isinstance(tree, dict):
        return nnx.Dict({k: _wrap_tree(v, None if axes is None else axes[k], path + (k,)) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return nnx.List([_wrap_tree(v, None if axes is None else axes[i], path + (i,)) for i, v in enumerate(tree)])
    kind = Buffer if path and path[-1] in BUFFERS else nnx.Param
    meta = {} if axes is None else dict(out_sharding=tuple(axes), sharding_rules=AXIS_RULES)
    # eager_sharding=False: keep the array as it is (flax would otherwise place it on a mesh now)
    return kind(tree, eager_sharding=False, **meta)


def _unwrap(node):
    """The inverse of :func:`_wrap_tree`: the params pytree of the variables' arrays (the same objects)."""
    if isinstance(node, nnx.Variable):
        return node.get_value()
    if isinstance(node, nnx.List):
        return [_unwrap(v) for v in node]
    if isinstance(node, nnx.Dict):
        return {k: _unwrap(v) for k, v in node.items()}
    raise TypeError(f"unexpected node {type(node).__name__} in an adsa_jax.nn module")


class _Wrapper(nnx.Module):
    """A module whose attributes are the top-level entries of a functional params pytree."""

    def _set_params(self, params: dict, axes):
        self._names = tuple(params)
        for k, v in params.items():
            setattr(self, k, _wrap_tree(v, None if axes is None else axes[k], (k,)))

    def _params(self) -> dict:
        return {k: _unwrap(getattr(self, k)) for k in self._names}


def _check_params(params, shapes, what: str):
    """The params must be the config's tree with its shapes (one clear line otherwise)."""
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    want_def = jax.tree.structure(shapes, is_leaf=M._is_shape)
    if jax.tree.structure(got, is_leaf=M._is_shape) != want_def:
        raise ConfigError(f"{what} params do not have the tree of their config's param_shapes; "
                          "load them with adsa_jax.load / load_vq")
    bad = [(jax.tree_util.keystr(p), g, w) for (p, g), w in
           zip(jax.tree_util.tree_flatten_with_path(got, is_leaf=M._is_shape)[0],
               jax.tree.leaves(shapes, is_leaf=M._is_shape)) if g != w]
    if bad:
        p, g, w = bad[0]
        raise ConfigError(f"{what} weight {p} has shape {g}, its config needs {w}")


class GPT(_Wrapper):
    """LlamaGen's GPT as an ``nnx.Module``: the params of :class:`adsa_jax.Model` as ``nnx.Param``.

    ``GPT(config, rngs=nnx.Rngs(0))``: random weights (:func:`adsa_jax.model.init_params`:
    normal(0, ``std``), norms at 1) in ``dtype`` (float32 by default, for training).
    ``GPT.from_model(model)``: a loaded model's arrays, not copied.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32, std: float = 0.02,
                 params: dict | None = None):
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"nn.GPT needs a GPTConfig, got {type(config).__name__}")
        if (rngs is None) == (params is None):
            raise ConfigError("nn.GPT takes rngs= (random weights) or params= (existing arrays), exactly one; "
                              "wrap a loaded model with nn.GPT.from_model(model)")
        if params is None:
            params = M.init_params(config, rngs.params(), dtype, std)
        else:
            _check_params(params, M.param_shapes(config), "GPT")
        self.config = config
        self._set_params(params, S.param_axes(config))

    @classmethod
    def from_model(cls, model: Model) -> "GPT":
        """Wrap a loaded :class:`adsa_jax.Model`: the module's variables hold its arrays (no copy)."""
        if not isinstance(model, Model):
            raise ConfigError(f"nn.GPT.from_model needs an adsa_jax.Model (from adsa_jax.load), got "
                              f"{type(model).__name__}")
        return cls(model.config, params=model.params)

    def to_model(self) -> Model:
        """The functional :class:`adsa_jax.Model` of the current arrays (not copied): for
        ``generate``, ``score``, ``checkpoint.save_gpt`` or ``jax.jit`` over plain pytrees."""
        return Model(self.config, self._params())

    def __call__(self, cond, tokens, cond_mask=None):
        """Teacher-forced next-token logits (B, N, V) float32: :func:`adsa_jax.forward`.

        cond: class ids (B,) (c2i) or caption features (B, 120, C) with ``cond_mask`` (t2i);
        tokens (B, N) or (B, N-1); row j of the result predicts image token j."""
        return forward(self.to_model(), cond, tokens, cond_mask=cond_mask)


class VQ(_Wrapper):
    """LlamaGen's VQ tokenizer as an ``nnx.Module`` over :class:`adsa_jax.VQModel`'s params."""

    def __init__(self, config: V.VQConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32, std: float = 0.02,
                 params: dict | None = None):
        if not isinstance(config, V.VQConfig):
            raise ConfigError(f"nn.VQ needs a VQConfig, got {type(config).__name__}")
        if (rngs is None) == (params is None):
            raise ConfigError("nn.VQ takes rngs= (random weights) or params= (existing arrays), exactly one; "
                              "wrap a loaded tokenizer with nn.VQ.from_model(vq)")
        if params is None:
            params = V.init_vq_params(config, rngs.params(), dtype, std)
        else:
            _check_params(params, V.vq_param_shapes(config), "VQ")
        self.config = config
        self._set_params(params, None)

    @classmethod
    def from_model(cls, vq: V.VQModel) -> "VQ":
        """Wrap a loaded :class:`adsa_jax.VQModel` (no copy)."""
        if not isinstance(vq, V.VQModel):
            raise ConfigError(f"nn.VQ.from_model needs an adsa_jax.VQModel (from load_vq), got {type(vq).__name__}")
        return cls(vq.config, params=vq.params)

    def to_model(self) -> V.VQModel:
        return V.VQModel(self.config, self._params())

    def __call__(self, codes, *, grid=None, dtype=None):
        """Codes (B, h*w) -> images (B, H, W, 3) float32: :func:`adsa_jax.decode_codes`."""
        return V.decode_codes(self.to_model(), codes, grid=grid, dtype=dtype)

    def encode(self, images, *, dtype=None):
        """Images (B, H, W, 3) in [-1, 1] -> codes (B, h*w): :func:`adsa_jax.encode_images`."""
        return V.encode_images(self.to_model(), images, dtype=dtype)
