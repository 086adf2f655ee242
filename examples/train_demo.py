"""Train the bundled demo model: a small LlamaGen c2i GPT on scikit-learn's digits.

    python examples/train_demo.py                    # the bundled checkpoint, on one GPU (~50 s on an H100):
                                                     # rewrites adsa_jax/data/demo_digits/
    python examples/train_demo.py --refresh adsa_jax/data/demo_digits   # then, on the CPU that runs the
                                                     # tests: its golden tokens and recorded NLLs
    python examples/train_demo.py --steps 200 --out /tmp/demo   # a quick run elsewhere
    examples/demo_gpu_sweep.sh OUTDIR                # candidates side by side on one GPU, best by validation NLL

The defaults are the bundled model's recipe, chosen on an H100 on 2026-11-23 by
examples/demo_gpu_sweep.sh: 6 layers x 192 (3 heads), 1,000 AdamW steps of 64 images (lr 1e-3, warmup
100, weight decay 0.1), random shifts of up to 2 px, checkpoint selected by NLL on a 10 % validation
split (it was the last step). On an H100 it trains in ~50 s; on a 2-core CPU the same run takes about
1.5 h (5.6 s/step measured on an idle 2-core AMD EPYC). For bit-equal weights on a GPU set
``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` (the sweep does, where XLA accepts it); the bundled
run was not repeated to check bit-identity.

The previous bundled model (until 2026-11-23) was trained on a 2-core CPU in ~10 min with
``--dim 128 --layers 4 --heads 2 --batch 8 --steps 3000 --lr 2e-3 --warmup 150 --weight-decay 0.05
--shift 0 --val-fraction 0`` (no augmentation, no validation split, last step kept); that command still
reproduces it bit for bit on the CPU it was trained on.

The project's own GPT (``adsa_jax.model``: same 2D RoPE, ``embed_condition`` class path,
``forward_full``) trained with teacher-forced cross entropy, CFG-style class dropout (a label
becomes the null class with probability 0.1), optax AdamW (betas 0.9/0.95, weight decay on
matrices only, global-norm clip 1.0, warmup + cosine), fp32, a fixed seed, and a random
translation of each training image by up to ``--shift`` pixels (zero fill; on the device).

Model selection: ``--val-fraction`` of the *training* images (stratified by class, a fixed seed)
are set aside as a validation split; every ``--eval-every`` steps the dense NLL on it is
measured, and the parameters with the lowest validation NLL are the ones saved. The held-out
split (``demo.load_data``) is never looked at during training: its NLL is measured once, on
the selected parameters, for the log.

Writes the Orbax checkpoint (``adsa_jax.checkpoint.save_gpt``), ``train_log.json`` (arguments,
validation history, selected step, final NLLs, wall time, device) and ``golden_tokens.npy``
(the CI test's fixed sampling run) into ``--out``. Those NLLs and golden tokens are what *this*
device computes; a checkpoint trained on a GPU needs ``--refresh DIR`` on a CPU before the CPU
tests can match it (float rounding differs between devices). Evaluation runs at full fp32
matmul precision on every device.

No scikit-learn on the training machine? Write the data elsewhere with ``--save-data FILE.npz``
and train with ``--data FILE.npz``.
"""
from __future__ import annotations

import argparse
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
from adsa_jax.config import GPTConfig

VAL_SEED = 1  # the validation split carved from the training images
SHIFT_STREAM = 0x5EED  # fold_in tag of the augmentation's random stream


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, then cosine to 10 %%)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=int, default=2, help="augmentation: random translation by up to this many "
                   "pixels (zero fill), 0 turns it off")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training images set aside "
                   "to select the checkpoint (stratified, seed %d); 0: train on all, keep the last step" % VAL_SEED)
    p.add_argument("--eval-every", type=int, default=250, help="validation NLL every this many steps "
                   "(0: only at the end, i.e. no selection)")
    p.add_argument("--time-limit", type=float, default=0, help="safety net: stop training after this many "
                   "seconds (recorded in the log; 0: no limit)")
    p.add_argument("--out", default=str(demo.DEMO_DIR), help="checkpoint directory (overwritten)")
    p.add_argument("--data", default=None, help="the tokenised digits from an .npz (--save-data) instead of "
                   "scikit-learn")
    p.add_argument("--save-data", default=None, metavar="FILE.npz", help="write the tokenised digits and their "
                   "held-out split to FILE.npz (needs scikit-learn) and exit")
    p.add_argument("--params-npz", default=None, help="also write the selected fp32 params to this .npz; "
                   "with --refresh, rebuild the Orbax tree from it with this machine's Orbax")
    p.add_argument("--refresh", default=None, metavar="DIR", help="train nothing: recompute DIR's golden tokens "
                   "and recorded NLLs on this machine (after training on another device)")
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps after compiling, then exit")
    return p.parse_args(argv)


def validation_split(labels, fraction, seed=VAL_SEED):
    """Indices (train, val) into ``labels``: round(fraction * n_c) images of each class c to val."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.extend(rng.permutation(idx)[:int(round(fraction * len(idx)))])
    val = np.sort(np.asarray(val, np.int64))
    return np.setdiff1d(np.arange(len(labels)), val), val


def shift_tokens(tokens, key, max_shift: int):
    """Translate each 16x16 token image (B, 256) by a random (dy, dx) in [-max_shift, max_shift]^2,
    filling with token 0 (the background): pad, then cut a 16x16 window at a random offset."""
    if max_shift <= 0:
        return tokens
    s = demo.SIDE
    img = jnp.pad(tokens.reshape(-1, s, s), ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    off = jax.random.randint(key, (img.shape[0], 2), 0, 2 * max_shift + 1)
    out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1]), (s, s)))(img, off)
    return out.reshape(-1, s * s)


def make_train_step(cfg, opt, max_shift):
    def loss_fn(params, tokens, labels, key):
        drop = jax.random.bernoulli(key, cfg.class_dropout_prob, labels.shape)
        labels = jnp.where(drop, cfg.null_class, labels)  # CFG training: the null class row
        emb = M.embed_condition(params, cfg, labels, None)  # (B, 1, E)
        mask = jnp.ones((tokens.shape[0], cfg.cls_token_num), bool)
        logits = M.forward_full(params, cfg, emb, mask, tokens[:, :-1])  # (B, N, V): row j predicts token j
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(lp, tokens[..., None], -1).mean()

    @jax.jit
    def step(params, opt_state, all_tokens, all_labels, idx, key):
        # the class-dropout draw uses `key` itself (as before --shift existed, so old runs reproduce)
        tokens = shift_tokens(all_tokens[idx], jax.random.fold_in(key, SHIFT_STREAM), max_shift)
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, all_labels[idx], key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return step


def progress(step, total, loss, t0, extra=""):
    el = time.perf_counter() - t0
    rate = step / max(el, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    bar = "#" * int(30 * step / total)
    sys.stderr.write(f"\r[{bar:<30}] {step}/{total} loss {loss:.4f} {rate:.2f} it/s "
                     f"elapsed {el:5.0f}s ETA {eta:5.0f}s{extra}   ")
    sys.stderr.flush()


def nll(model, labels, tokens):
    """Dense teacher-forced NLL per token at full fp32 matmul precision (comparable across devices)."""
    with jax.default_matmul_precision("highest"):
        return demo.dense_nll(model, labels, tokens)


def final_numbers(model, data, train_idx, val_idx):
    """The log's "final" block, computed on this device."""
    tr_t, tr_l = data["train_tokens"], data["train_labels"]
    ho_t, ho_l = data["heldout_tokens"], data["heldout_labels"]
    sub = demo.NLL_SUBSET
    t = time.perf_counter()
    out = {"train_nll_per_token": nll(model, tr_l[train_idx], tr_t[train_idx]),
           "val_nll_per_token": nll(model, tr_l[val_idx], tr_t[val_idx]) if len(val_idx) else None,
           "heldout_nll_per_token": nll(model, ho_l, ho_t),
           f"heldout_first{sub}_nll_per_token": nll(model, ho_l[:sub], ho_t[:sub]), "nll_subset_size": sub}
    out["eval_wall_s"] = round(time.perf_counter() - t, 1)
    out["device"] = device_name()
    return out


def write_golden(model, out: Path):
    with jax.default_matmul_precision("highest"):
        gold = demo.golden_tokens(model)
    np.save(out / demo.GOLDEN_TOKENS, gold)
    return gold


def device_name():
    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s), {platform.processor() or platform.machine()}"


def versions():
    import orbax.checkpoint as ocp

    return {"jax": jax.__version__, "optax": optax.__version__, "orbax-checkpoint": ocp.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def params_to_npz(params, path):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x, np.float32) for p, x in flat})


def params_from_npz(cfg, path):
    shapes = M.param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=M._is_shape)
    with np.load(path) as z:
        keys = [jax.tree_util.keystr(p) for p, _ in flat]
        missing = [k for k in keys if k not in z.files]
        if missing or len(z.files) != len(keys):
            raise SystemExit(f"{path} does not hold this config's params (missing {missing[:3]}, "
                             f"{len(z.files)} arrays for {len(keys)} weights)")
        leaves = []
        for k, (_, shape) in zip(keys, flat):
            if z[k].shape != shape:
                raise SystemExit(f"{path}: {k} has shape {z[k].shape}, the config needs {shape}")
            leaves.append(np.asarray(z[k], np.float32))
    return jax.tree.unflatten(treedef, leaves)


def refresh(a):
    """Recompute a checkpoint's golden tokens and recorded NLLs on this machine (keeps the rest of
    the log; the training device's numbers move to ``final_on_training_device``)."""
    out = Path(a.refresh)
    log = demo.read_train_log(out)
    if a.params_npz:  # rewrite the Orbax tree with this machine's Orbax
        meta = json.loads((out / "adsa_config.json").read_text())
        cfg = GPTConfig.from_dict(meta["config"])
        save_gpt(out, params_from_npz(cfg, a.params_npz), cfg, image_size=meta["image_size"], overwrite=True,
                 source=meta.get("source"))  # empties the directory: the log is written again below
    model = demo.load_demo_model(out, dtype="float32")
    data = demo.load_data(a.data)
    n_val = log["data"].get("val_images", 0)
    train_idx, val_idx = validation_split(data["train_labels"], log["training"].get("val_fraction", 0.0))
    if len(val_idx) != n_val:
        raise SystemExit(f"the validation split has {len(val_idx)} images, the log says {n_val}")
    new = final_numbers(model, data, train_idx, val_idx)
    old = log["final"]
    log.setdefault("final_on_training_device", {k: v for k, v in old.items()})
    sub = demo.NLL_SUBSET
    key = f"heldout_first{sub}_nll_per_token"
    diff = abs(new[key] - log["final_on_training_device"][key])
    new["note"] = (f"recomputed on {new['device']} with jax {jax.__version__} by --refresh; the training device "
                   f"gave {log['final_on_training_device'][key]:.6f} for {key} (difference {diff:.1e})")
    log["final"] = new
    gold = write_golden(model, out)
    log["golden"] = dict(demo.GOLDEN, file=demo.GOLDEN_TOKENS, dtype="float32", device=new["device"],
                         jax=jax.__version__)
    log["checkpoint_written_by"] = {"orbax-checkpoint": versions()["orbax-checkpoint"]} if a.params_npz else \
        log.get("checkpoint_written_by")
    (out / demo.TRAIN_LOG).write_text(json.dumps(log, indent=1))
    print(f"refreshed {out}: held-out NLL {new['heldout_nll_per_token']:.6f} (first {sub}: {new[key]:.6f}; "
          f"training device {log['final_on_training_device'][key]:.6f}); golden tokens {gold.shape}", file=sys.stderr)


def main():
    a = parse()
    if a.save_data:
        print(f"demo data -> {demo.save_data(a.save_data)}", file=sys.stderr)
        return
    if a.refresh:
        return refresh(a)
    data = demo.load_data(a.data)
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
    step_fn = make_train_step(cfg, opt, a.shift)
    rng = np.random.default_rng(a.seed)
    train_idx, val_idx = validation_split(data["train_labels"], a.val_fraction)
    tr_t, tr_l = data["train_tokens"][train_idx], data["train_labels"][train_idx]
    va_t, va_l = data["train_tokens"][val_idx], data["train_labels"][val_idx]
    dev_t, dev_l = jnp.asarray(tr_t), jnp.asarray(tr_l)
    print(f"demo GPT: {cfg.n_layer} layers x {cfg.dim} ({cfg.n_head} heads), vocab {cfg.vocab_size}, "
          f"grid {cfg.grid}x{cfg.grid}, {n_params:,} params; {len(tr_l)} train / {len(va_l)} validation "
          f"(from the training split) / {len(data['heldout_labels'])} held-out images; shift <= {a.shift} px; "
          f"device {device_name()}", file=sys.stderr)

    perm, pos = rng.permutation(len(tr_l)), 0

    def next_idx():
        nonlocal perm, pos
        if pos + a.batch > len(perm):
            perm, pos = rng.permutation(len(tr_l)), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        return jnp.asarray(idx, jnp.int32)

    t_c = time.perf_counter()
    params, opt_state, loss, _ = step_fn(params, opt_state, dev_t, dev_l, next_idx(), jax.random.fold_in(key, 1))
    loss.block_until_ready()  # step 1, with the compilation
    compile_s = time.perf_counter() - t_c
    if a.time_steps:
        t = time.perf_counter()
        for i in range(a.time_steps):
            params, opt_state, loss, _ = step_fn(params, opt_state, dev_t, dev_l, next_idx(),
                                                 jax.random.fold_in(key, 2 + i))
        loss.block_until_ready()
        dt = (time.perf_counter() - t) / a.time_steps
        print(f"compile+first step {compile_s:.1f}s; {dt:.4f} s/step -> {a.steps} steps ~ {dt * a.steps / 60:.1f} min",
              file=sys.stderr)
        return

    def val_nll(p):
        return nll(adsa_jax.Model(cfg, p), va_l, va_t) if len(va_l) else float("nan")

    t0 = time.perf_counter()
    history, ema, extra = [], None, ""
    best = {"step": 1, "val_nll": float("inf"), "params": params}
    stopped = None
    last = 1
    for n in range(2, a.steps + 1):  # n: the step being run (step 1 compiled above)
        params, opt_state, loss, gnorm = step_fn(params, opt_state, dev_t, dev_l, next_idx(),
                                                 jax.random.fold_in(key, n))
        last = n
        if n % 10 == 0 or n == a.steps:
            lv = float(loss)
            if not np.isfinite(lv):
                raise SystemExit(f"\nloss became {lv} at step {n}: lower --lr")
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            evaluate = a.eval_every and len(va_l) and (n % a.eval_every == 0 or n == a.steps)
            over = a.time_limit and (time.perf_counter() - t0 + compile_s) > a.time_limit
            if evaluate or over:
                v = val_nll(params)
                history.append({"step": n, "train_loss_ema": ema, "val_nll": v,
                                "elapsed_s": round(time.perf_counter() - t0, 1)})
                if v < best["val_nll"]:
                    best = {"step": n, "val_nll": v, "params": params}
                extra = f" | val {v:.4f} (best {best['val_nll']:.4f} @ {best['step']})"
            progress(n, a.steps, ema, t0, extra)
            if over and n < a.steps:
                stopped = n
                sys.stderr.write(f"\n--time-limit {a.time_limit:g} s reached: stopped at step {stopped}")
                break
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t0 + compile_s
    sys.stderr.write("\n")
    if not (a.eval_every and len(va_l)):
        best = {"step": last, "val_nll": None, "params": params}
    params = best.pop("params")

    # Final numbers (fp32, no class dropout, no augmentation), through the library's forward.
    model = adsa_jax.Model(cfg, params)
    final = final_numbers(model, data, train_idx, val_idx)
    out = Path(a.out)
    np_params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    save_gpt(out, np_params, cfg, image_size=demo.SIDE * 16, overwrite=True,
             source="examples/train_demo.py (sklearn digits, 16-level gray quantiser)")
    if a.params_npz:
        params_to_npz(np_params, a.params_npz)
    loaded = demo.load_demo_model(out, dtype="float32")  # golden tokens from the restored checkpoint
    write_golden(loaded, out)
    ckpt_bytes = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    log = {
        "model": {"dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "ffn_hidden": cfg.ffn_hidden,
                  "vocab_size": cfg.vocab_size, "grid": cfg.grid, "params": n_params, "dtype": "float32",
                  "checkpoint_bytes": ckpt_bytes},
        "data": {"dataset": "sklearn.datasets.load_digits upscaled 8x8 -> 16x16 (bilinear)",
                 "tokenizer": f"fixed {demo.LEVELS}-level gray quantiser", "train_images": int(len(tr_l)),
                 "val_images": int(len(va_l)), "heldout_images": int(len(data["heldout_labels"])),
                 "split": f"held-out: stratified, seed {demo.SPLIT_SEED}, {demo.HELDOUT_FRACTION:.0%} of all images; "
                          f"validation: {a.val_fraction:.0%} of the training split per class, seed {VAL_SEED}",
                 "augmentation": f"random shift <= {a.shift} px (zero fill)"},
        "training": {"args": vars(a), "steps": a.steps, "steps_run": stopped or a.steps, "batch": a.batch,
                     "lr": a.lr, "warmup": a.warmup, "schedule": "cosine to 10%",
                     "optimizer": "AdamW b1 0.9 b2 0.95, clip 1.0", "weight_decay": a.weight_decay,
                     "class_dropout": cfg.class_dropout_prob, "seed": a.seed, "val_fraction": a.val_fraction,
                     "selected_step": best["step"], "selected_val_nll": best["val_nll"],
                     "stopped_by_time_limit": stopped, "wall_s": round(train_s, 1), "compile_s": round(compile_s, 1),
                     "s_per_step": round((train_s - compile_s) / max((stopped or a.steps) - 1, 1), 5),
                     "history": history},
        "final": final,
        "golden": dict(demo.GOLDEN, file=demo.GOLDEN_TOKENS, dtype="float32", device=device_name(),
                       jax=jax.__version__),
        "device": device_name(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / demo.TRAIN_LOG).write_text(json.dumps(log, indent=1))
    sub = demo.NLL_SUBSET
    print(f"done in {train_s / 60:.1f} min ({log['training']['s_per_step'] * 1e3:.1f} ms/step): selected step "
          f"{best['step']} (val NLL {final['val_nll_per_token']}); train NLL {final['train_nll_per_token']:.4f}, "
          f"held-out NLL {final['heldout_nll_per_token']:.4f} (first {sub}: "
          f"{final[f'heldout_first{sub}_nll_per_token']:.4f}) nats/token; checkpoint {ckpt_bytes / 2**20:.2f} MiB "
          f"-> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
