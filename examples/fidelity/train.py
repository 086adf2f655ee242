"""The lab's model: the project's LlamaGen GPT (c2i) trained on the emoji tokens, several seeds at once.

Seeds train side by side in one program (``jax.vmap`` over stacked params, optimizer states and
per-seed data orders), each with its own initialisation and data order. AdamW with warm-up plus
cosine, bf16 compute over fp32 master weights, class dropout 0.1 for CFG. The run resumes from its
Orbax checkpoint, so it can be split into pieces of at most 10 minutes (``--time-limit``).
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adsa_jax import model as M
from adsa_jax.config import ConfigError, GPTConfig

import data as lab_data

CLASS_DROPOUT = 0.1


def lab_config(vocab: int, num_classes: int, grid: int, *, dim: int = 512, layers: int = 12, heads: int = 8) -> GPTConfig:
    return GPTConfig(dim=dim, n_layer=layers, n_head=heads, multiple_of=256, num_classes=num_classes,
                     class_dropout_prob=CLASS_DROPOUT, model_type="c2i", vocab_size=vocab, cls_token_num=1,
                     block_size=grid * grid)


def data_config(data_file: Path, *, dim: int = 512, layers: int = 12, heads: int = 8) -> GPTConfig:
    """The lab's GPT config for the tokens in ``data_file`` (grid, vocabulary and classes from the data)."""
    z = np.load(data_file)
    grid = int(round(z["train_tokens"].shape[1] ** 0.5))
    vocab = 1 + int(max(int(z["train_tokens"].max()), int(z["heldout_tokens"].max())))
    vocab = max(vocab, int(np.load(data_file.parent / "tokenizer.npz")["codebook"].shape[0]))
    return lab_config(vocab, int(z["repeat_class"]) + 1, grid, dim=dim, layers=layers, heads=heads)


def lr_at(step, total, peak, warmup, floor=0.1):
    """Linear warm-up to peak, then cosine to floor * peak at ``total``."""
    step = np.asarray(step, np.float64)
    warm = peak * np.minimum(1.0, (step + 1) / max(warmup, 1))
    frac = np.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cos = peak * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * frac)))
    return np.where(step < warmup, warm, cos).astype(np.float32)


def _decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)  # weight decay on matrices only


def make_tx(weight_decay):
    # the learning rate is applied by the step (a traced scalar), so the schedule lives on the host
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.95),
                       optax.add_decayed_weights(weight_decay, _decay_mask))


def nll_fn(cfg):
    def nll(params, tokens, labels):
        """Mean NLL per token (nats) of tokens (B, N) under bf16 compute."""
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        emb = M.embed_condition(p16, cfg, labels, None)  # (B, 1, E)
        mask = jnp.ones((tokens.shape[0], 1), bool)
        logits = M.forward_full(p16, cfg, emb, mask, tokens[:, :-1])  # (B, N, V) float32
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0]  # (B, N)
    return nll


def make_steps(cfg, tx, donate: bool = True):
    nll = nll_fn(cfg)

    def loss_fn(params, tokens, labels, key):
        drop = jax.random.bernoulli(key, CLASS_DROPOUT, labels.shape)
        labels = jnp.where(drop, cfg.null_class, labels)
        return nll(params, tokens, labels).mean()

    def one(carry, xs):
        params, opt_state = carry
        tokens, labels, key, lr = xs
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels, key)
        upd, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, upd)
        return (params, opt_state), loss

    def seed_steps(params, opt_state, tokens, labels, keys, lrs):
        return jax.lax.scan(one, (params, opt_state), (tokens, labels, keys, lrs))

    # params and optimizer state are donated: each chunk updates them in place instead of allocating
    # a second copy (1.5 GB for three 42M seeds) next to the live one
    @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
    def train_chunk(params, opt_state, all_tokens, all_labels, idx, keys, lrs):
        """idx (S, n, B) per-seed batches of n steps; keys (S, n); lrs (n,). Returns new state, losses (S, n)."""
        toks, labs = all_tokens[idx], all_labels[idx]  # (S, n, B, N), (S, n, B)
        (params, opt_state), losses = jax.vmap(seed_steps, in_axes=(0, 0, 0, 0, 0, None))(
            params, opt_state, toks, labs, keys, lrs)
        return params, opt_state, losses

    @jax.jit
    def eval_nll(params, tokens, labels):
        """(S,) mean NLL per token and (S, B, N) per-token NLL of one batch, for every seed."""
        per = jax.vmap(lambda p: nll(p, tokens, labels))(params)
        return per.mean(axis=(1, 2)), per

    return train_chunk, eval_nll


def data_order(seed: int, n: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, n: int, batch: int, steps: range) -> np.ndarray:
    """(len(steps), batch) indices of these global steps in seed's order (epochs reshuffled)."""
    per_epoch = n // batch
    out = []
    for s in steps:
        e, j = divmod(s, per_epoch)
        out.append(data_order(seed, n, e)[j * batch:(j + 1) * batch])
    return np.stack(out)


def _ckpt_state(params, opt_state, step, total):
    return {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int64), "total": np.asarray(total, np.int64)}


def train(data_file: Path, run_dir: Path, *, seeds=(0, 1, 2), batch: int = 64, peak_lr: float = 6e-4,
          warmup: int = 300, weight_decay: float = 0.05, total_steps: int = 0, step_seconds: float = 0.0,
          time_limit: float = 540.0, chunk: int = 50, eval_every: int = 250, eval_images: int = 512,
          dim: int = 512, layers: int = 12, heads: int = 8, on_compiled=None, log=print) -> dict:
    """Train (or resume) len(seeds) models side by side. total_steps 0: sized from the measured step
    time so that training ends inside ``time_limit`` (then fixed and stored for every resume).
    ``on_compiled()``: called once the training program has compiled and run its first chunk (``lab.py
    run`` starts compiling the evaluation then: threads tracing programs beside this one's compile
    held the Python lock and delayed the first step by about a minute on the H200)."""
    import orbax.checkpoint as ocp

    t_start = time.time()
    z = np.load(data_file)
    tokens = jnp.asarray(z["train_tokens"].astype(np.int32))
    labels = jnp.asarray(z["train_labels"].astype(np.int32))
    ho_t = z["heldout_tokens"].astype(np.int32)[:eval_images]
    ho_l = z["heldout_labels"].astype(np.int32)[:eval_images]
    rp_t = z["repeat_tokens"].astype(np.int32)[:eval_images]
    repeat_class = int(z["repeat_class"])
    cfg = data_config(data_file, dim=dim, layers=layers, heads=heads)
    S = len(seeds)
    n = tokens.shape[0]
    tx = make_tx(weight_decay)
    train_chunk, eval_nll = make_steps(cfg, tx)
    run_dir = run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "train_log.json"
    hist = lab_data.read_json(log_file, ("train", "eval"), default={"train": [], "eval": []})

    init = jax.jit(jax.vmap(lambda k: M.init_params(cfg, k, jnp.float32)))
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    params = init(keys)
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    mngr = ocp.CheckpointManager(run_dir / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1))
    # the held-out optimum, params only: 13.5k images overfit within a few epochs, and the policies are
    # compared on the best model, not on the last one
    best_mngr = ocp.CheckpointManager(run_dir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1))
    step = 0
    if mngr.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _ckpt_state(params, opt_state, 0, 0))
        st = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        params, opt_state, step, total_steps = st["params"], st["opt_state"], int(st["step"]), int(st["total"])
        log(f"train: resumed at step {step} of {total_steps}")
    nparams = M.count_params(cfg)
    log(f"train: {S} seeds x {nparams / 1e6:.1f}M params ({cfg.n_layer} layers x {cfg.dim}), {n} sequences of "
        f"{tokens.shape[1]} tokens, vocab {cfg.vocab_size}, {cfg.num_classes} classes, batch {batch} per seed")

    def chunk_inputs(a, b, total):
        idx = np.stack([batch_indices(s, n, batch, range(a, b)) for s in seeds])  # (S, n, B)
        ks = jnp.stack([jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1000 + s), i))(jnp.arange(a, b))
                        for s in seeds])  # (S, n)
        return jnp.asarray(idx), ks, jnp.asarray(lr_at(np.arange(a, b), total, peak_lr, warmup))

    def evaluate(step_now):
        res = {"step": step_now, "heldout_nll": np.zeros(S), "repeat_nll": np.zeros(S), "repeat_lower_top1": None}
        tot = np.zeros(S)
        for a in range(0, len(ho_t), 128):
            m, _ = eval_nll(params, jnp.asarray(ho_t[a:a + 128]), jnp.asarray(ho_l[a:a + 128]))
            tot += np.asarray(m) * len(ho_t[a:a + 128])
        res["heldout_nll"] = (tot / len(ho_t)).tolist()
        tot = np.zeros(S)
        for a in range(0, len(rp_t), 128):
            m, per = eval_nll(params, jnp.asarray(rp_t[a:a + 128]), jnp.full((len(rp_t[a:a + 128]),), repeat_class, jnp.int32))
            tot += np.asarray(m) * len(rp_t[a:a + 128])
        res["repeat_nll"] = (tot / len(rp_t)).tolist()
        res["seconds"] = round(time.time() - t_start, 1)
        prev = [float(np.mean(e["heldout_nll"])) for e in hist["eval"]]
        if not prev or float(np.mean(res["heldout_nll"])) < min(prev):
            best_mngr.save(step_now, args=ocp.args.StandardSave({"params": params}))
            best_mngr.wait_until_finished()
            hist["best_step"] = step_now
        hist["eval"].append(res)
        log(f"train: step {step_now} held-out NLL {np.round(res['heldout_nll'], 4).tolist()} "
            f"repeat NLL {np.round(res['repeat_nll'], 4).tolist()}")

    def save():
        mngr.save(step, args=ocp.args.StandardSave(_ckpt_state(params, opt_state, step, total_steps)))
        mngr.wait_until_finished()
        log_file.write_text(json.dumps(hist, indent=0))

    if total_steps == 0:  # size the run: compile, time one chunk, fit the rest in the time limit
        t0 = time.time()
        log("train: compiling...")
        a = step
        idx, ks, lrs = chunk_inputs(a, a + chunk, 10 ** 9)
        copy = lambda: jax.tree.map(jnp.copy, (params, opt_state))  # noqa: E731  (the chunk donates its state)
        out = train_chunk(*copy(), tokens, labels, idx, ks, lrs)
        jax.block_until_ready(out)
        t1 = time.time()
        log(f"train: compiled in {t1 - t0:.1f} s")
        state = copy()
        jax.block_until_ready(state)
        t1 = time.time()
        out = train_chunk(*state, tokens, labels, idx, ks, lrs)
        jax.block_until_ready(out)
        per_step = (time.time() - t1) / chunk
        left = time_limit - (time.time() - t_start) - 60.0  # evaluation and checkpoint reserve
        total_steps = step_seconds and int(left / step_seconds) or int(left / per_step)
        total_steps = max(chunk, (total_steps // chunk) * chunk)
        log(f"train: {per_step * 1000:.0f} ms per step ({S} seeds); total set to {total_steps} steps")
    epoch = n / batch
    while step < total_steps:
        if time.time() - t_start > time_limit - 45:
            log(f"train: time limit: stopping at step {step} (resume with the same command)")
            break
        b = min(step + chunk, total_steps)
        if b - step != chunk:
            b = step + chunk  # keep one compiled shape; the schedule is flat at its floor past total
        idx, ks, lrs = chunk_inputs(step, b, total_steps)
        t0 = time.time()
        params, opt_state, losses = train_chunk(params, opt_state, tokens, labels, idx, ks, lrs)
        losses = np.asarray(losses)
        step = b
        hist["train"].append({"step": step, "loss": losses.mean(axis=1).tolist(), "lr": float(lrs[-1]),
                              "seconds": round(time.time() - t_start, 1)})
        log(f"train: step {step}/{total_steps} (epoch {step / epoch:.1f}) loss {np.round(losses.mean(axis=1), 4).tolist()} "
            f"{(time.time() - t0) / chunk * 1000:.0f} ms/step")
        if on_compiled is not None:
            on_compiled()
            on_compiled = None
        if step % eval_every == 0 or step >= total_steps:
            evaluate(step)
            save()
    if not hist["eval"] or hist["eval"][-1]["step"] != step:
        evaluate(step)
    save()
    meta = {"config": cfg.to_dict(), "seeds": list(seeds), "params": nparams, "step": step, "total_steps": total_steps,
            "batch": batch, "peak_lr": peak_lr, "warmup": warmup, "weight_decay": weight_decay,
            "done": step >= total_steps, "best_step": hist.get("best_step"), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__}
    (run_dir / "model.json").write_text(json.dumps(meta, indent=1))
    mngr.close()
    best_mngr.close()
    return meta


def load_trained(run_dir: Path, which: str = "best"):
    """(GPTConfig, stacked fp32 params (S, ...), meta) of a trained run: the held-out optimum ("best",
    when the run saved one) or the last step ("last"). meta["evaluated_step"] says which step it is."""
    import orbax.checkpoint as ocp

    run_dir = run_dir.absolute()
    meta = lab_data.read_json(run_dir / "model.json", ("config", "seeds"))
    cfg = GPTConfig.from_dict(meta["config"])
    sub = "best" if which == "best" and (run_dir / "best").is_dir() else "ckpt"
    mngr = ocp.CheckpointManager(run_dir / sub)
    step = mngr.latest_step()
    st = mngr.restore(step, args=ocp.args.StandardRestore())  # the tree as saved
    mngr.close()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), st["params"])
    meta["evaluated_step"], meta["evaluated_checkpoint"] = int(step), "best" if sub == "best" else "last"
    return cfg, params, meta


def export(run_dir: Path, out: Path, data_dir: Path, *, seed_index: int = 0, log=print) -> Path:
    """One seed's held-out optimum as an adsa_jax checkpoint in bf16 (``adsa_jax.load(out)``), with the
    lab's tokenizer (k-means codebook of 2x2 RGB patches) beside it as ``tokenizer.npz``."""
    import shutil

    from adsa_jax.checkpoint import check_output_dir, save_gpt

    check_output_dir(Path(out).absolute())  # a clear error before anything loads
    cfg, params, meta = load_trained(run_dir)
    S = len(meta["seeds"])
    if not 0 <= seed_index < S:
        raise ConfigError(f"--seed-index {seed_index} is out of range: {run_dir} has {S} seed(s), 0 to {S - 1}")
    one = jax.tree.map(lambda x: np.asarray(x[seed_index].astype(jnp.bfloat16)), params)
    grid = int(round(cfg.block_size ** 0.5))
    save_gpt(out, one, cfg, image_size=2 * grid, source=f"fidelity lab run {run_dir.name}, seed {meta['seeds'][seed_index]}, "
             f"step {meta['evaluated_step']}")
    shutil.copyfile(data_dir / "tokenizer.npz", out / "tokenizer.npz")
    log(f"export: seed {meta['seeds'][seed_index]} step {meta['evaluated_step']} -> {out} "
        f"({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2 ** 20:.1f} MiB)")
    return out


if __name__ == "__main__":
    sys.exit("run through lab.py: python examples/fidelity/lab.py train ...")
