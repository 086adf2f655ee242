"""Train the bundled demo model: a small LlamaGen c2i GPT on scikit-learn's digits (CPU, minutes).

    python examples/train_demo.py                      # rewrites adsa_jax/data/demo_digits/
    python examples/train_demo.py --steps 200 --out /tmp/demo   # a quick run elsewhere

The project's own GPT (``adsa_jax.model``: same 2D RoPE, ``embed_condition`` class path,
``forward_full``) trained with teacher-forced cross entropy, CFG-style class dropout (a label
becomes the null class with probability 0.1), optax AdamW (betas 0.9/0.95, weight decay on
matrices only, global-norm clip 1.0, warmup + cosine), fp32, a fixed seed. Writes the Orbax
checkpoint (``adsa_jax.checkpoint.save_gpt``), ``train_log.json`` (final NLLs, steps, wall
time, device) and ``golden_tokens.npy`` (the test's fixed sampling run) into ``--out``.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adsa_jax
from adsa_jax import demo
from adsa_jax import model as M
from adsa_jax.checkpoint import save_gpt


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup, then cosine to 10 %%)")
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=int, default=0, help="augmentation: random translation by up to this many "
                   "pixels (zero fill), 0 turns it off")
    p.add_argument("--eval-every", type=int, default=1000, help="held-out NLL every this many steps (0: only at the end)")
    p.add_argument("--out", default=str(demo.DEMO_DIR), help="checkpoint directory (overwritten)")
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps after compiling, then exit")
    return p.parse_args()


def make_train_step(cfg, opt):
    def loss_fn(params, tokens, labels, key):
        drop = jax.random.bernoulli(key, cfg.class_dropout_prob, labels.shape)
        labels = jnp.where(drop, cfg.null_class, labels)  # CFG training: the null class row
        emb = M.embed_condition(params, cfg, labels, None)  # (B, 1, E)
        mask = jnp.ones((tokens.shape[0], cfg.cls_token_num), bool)
        logits = M.forward_full(params, cfg, emb, mask, tokens[:, :-1])  # (B, N, V): row j predicts token j
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(lp, tokens[..., None], -1).mean()

    @jax.jit
    def step(params, opt_state, tokens, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return step


def shift_batch(rng, tokens, max_shift):
    """Random translation of each 16x16 token image by up to max_shift pixels (background 0)."""
    if max_shift <= 0:
        return tokens
    s = demo.SIDE
    img = tokens.reshape(-1, s, s)
    out = np.zeros_like(img)
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, len(img)))
    for i in range(len(img)):
        a = np.roll(img[i], (dy[i], dx[i]), axis=(0, 1))
        if dy[i] > 0: a[:dy[i]] = 0
        if dy[i] < 0: a[dy[i]:] = 0
        if dx[i] > 0: a[:, :dx[i]] = 0
        if dx[i] < 0: a[:, dx[i]:] = 0
        out[i] = a
    return out.reshape(len(img), s * s)


def progress(step, total, loss, t0, extra=""):
    el = time.perf_counter() - t0
    rate = step / max(el, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    bar = "#" * int(30 * step / total)
    sys.stderr.write(f"\r[{bar:<30}] {step}/{total} loss {loss:.4f} {rate:.2f} it/s "
                     f"elapsed {el:5.0f}s ETA {eta:5.0f}s{extra}   ")
    sys.stderr.flush()


def main():
    a = parse()
    data = demo.load_data()
    cfg = demo.demo_config(a.dim, a.layers, a.heads)
    key = jax.random.key(a.seed)
    params = M.init_params(cfg, jax.random.fold_in(key, 0), jnp.float32, std=0.02)
    params["output"] = jnp.zeros_like(params["output"])  # LlamaGen zero-initialises the head
    n_params = M.count_params(cfg)
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, max(a.steps, a.warmup + 1), a.lr * 0.1)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)  # weight decay on matrices / embeddings only
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=a.weight_decay, mask=decay_mask))
    opt_state = opt.init(params)
    step_fn = make_train_step(cfg, opt)
    rng = np.random.default_rng(a.seed)
    tr_t, tr_l = data["train_tokens"], data["train_labels"]
    ho_t, ho_l = data["heldout_tokens"], data["heldout_labels"]
    device = jax.devices()[0]
    print(f"demo GPT: {cfg.n_layer} layers x {cfg.dim} ({cfg.n_head} heads), vocab {cfg.vocab_size}, "
          f"grid {cfg.grid}x{cfg.grid}, {n_params:,} params; {len(tr_l)} train / {len(ho_l)} held-out images; "
          f"device {device.platform} ({device.device_kind})", file=sys.stderr)

    def heldout_nll(p):
        return demo.dense_nll(adsa_jax.Model(cfg, p), ho_l, ho_t)

    perm, pos = rng.permutation(len(tr_l)), 0

    def next_batch():
        nonlocal perm, pos
        if pos + a.batch > len(perm):
            perm, pos = rng.permutation(len(tr_l)), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        return jnp.asarray(shift_batch(rng, tr_t[idx], a.shift)), jnp.asarray(tr_l[idx])

    t_c = time.perf_counter()
    b = next_batch()
    params, opt_state, loss, _ = step_fn(params, opt_state, *b, jax.random.fold_in(key, 1))
    loss.block_until_ready()
    compile_s = time.perf_counter() - t_c
    if a.time_steps:
        t = time.perf_counter()
        for i in range(a.time_steps):
            params, opt_state, loss, _ = step_fn(params, opt_state, *next_batch(), jax.random.fold_in(key, 2 + i))
        loss.block_until_ready()
        dt = (time.perf_counter() - t) / a.time_steps
        print(f"compile+first step {compile_s:.1f}s; {dt:.3f} s/step -> {a.steps} steps ~ {dt * a.steps / 60:.1f} min",
              file=sys.stderr)
        return

    t0 = time.perf_counter()
    history, ema, extra = [], None, ""
    for s in range(1, a.steps):
        params, opt_state, loss, gnorm = step_fn(params, opt_state, *next_batch(), jax.random.fold_in(key, 1 + s))
        if s % 10 == 0 or s == a.steps - 1:
            lv = float(loss)
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            if a.eval_every and (s % a.eval_every == 0):
                h = heldout_nll(params)
                history.append({"step": s, "train_loss_ema": ema, "heldout_nll": h})
                extra = f" | held-out {h:.4f}"
            progress(s + 1, a.steps, ema, t0, extra)
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t0 + compile_s
    sys.stderr.write("\n")

    # Final numbers (fp32, no class dropout, no augmentation), through the library's forward.
    model = adsa_jax.Model(cfg, params)
    t_ev = time.perf_counter()
    train_nll = demo.dense_nll(model, tr_l, tr_t)
    ho_nll = demo.dense_nll(model, ho_l, ho_t)
    sub = demo.NLL_SUBSET
    ho_sub = demo.dense_nll(model, ho_l[:sub], ho_t[:sub])
    out = Path(a.out)
    save_gpt(out, jax.tree.map(lambda x: np.asarray(x, np.float32), params), cfg, image_size=demo.SIDE * 16,
             overwrite=True, source="examples/train_demo.py (sklearn digits, 16-level gray quantiser)")
    loaded = demo.load_demo_model(out, dtype="float32")  # golden tokens from the restored checkpoint
    gold = demo.golden_tokens(loaded)
    np.save(out / demo.GOLDEN_TOKENS, gold)
    ckpt_bytes = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    log = {
        "model": {"dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "ffn_hidden": cfg.ffn_hidden,
                  "vocab_size": cfg.vocab_size, "grid": cfg.grid, "params": n_params, "dtype": "float32",
                  "checkpoint_bytes": ckpt_bytes},
        "data": {"dataset": "sklearn.datasets.load_digits upscaled 8x8 -> 16x16 (bilinear)",
                 "tokenizer": f"fixed {demo.LEVELS}-level gray quantiser", "train_images": int(len(tr_l)),
                 "heldout_images": int(len(ho_l)), "split": f"stratified, seed {demo.SPLIT_SEED}, "
                 f"{demo.HELDOUT_FRACTION:.0%} held out", "augmentation": f"random shift <= {a.shift} px"},
        "training": {"steps": a.steps, "batch": a.batch, "lr": a.lr, "warmup": a.warmup, "schedule": "cosine to 10%",
                     "optimizer": "AdamW b1 0.9 b2 0.95, clip 1.0", "weight_decay": a.weight_decay,
                     "class_dropout": cfg.class_dropout_prob, "seed": a.seed, "wall_s": round(train_s, 1),
                     "compile_s": round(compile_s, 1), "history": history},
        "final": {"train_nll_per_token": train_nll, "heldout_nll_per_token": ho_nll,
                  f"heldout_first{sub}_nll_per_token": ho_sub, "nll_subset_size": sub,
                  "eval_wall_s": round(time.perf_counter() - t_ev, 1)},
        "golden": dict(demo.GOLDEN, file=demo.GOLDEN_TOKENS, dtype="float32"),
        "device": f"{device.platform} ({device.device_kind}), {jax.device_count()} device(s), "
                  f"{platform.processor() or platform.machine()}",
        "versions": {"jax": jax.__version__, "optax": optax.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / demo.TRAIN_LOG).write_text(json.dumps(log, indent=1))
    print(f"done in {train_s / 60:.1f} min: train NLL {train_nll:.4f}, held-out NLL {ho_nll:.4f} "
          f"(first {sub}: {ho_sub:.4f}) nats/token; checkpoint {ckpt_bytes / 2**20:.2f} MiB -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
