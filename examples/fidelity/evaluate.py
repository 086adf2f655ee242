"""Every policy x granularity x budget, on every trained seed: teacher-forced and generated metrics.

Per seed, one teacher-forced batch holds three kinds of rows, scored through each policy's cache:
held-out real images (NLL, paired with dense's), dense's own samples (the "dense trajectories":
KL(dense || policy) and top-1 agreement per step) and held-out repeat-diagnostic images (top-1 on the
lower half, whose every token is the token 288 steps earlier). Then each policy generates images
with the same keys as dense (class accuracy and feature FD under the lab's classifier, and on the
repeat class, the share of lower-half tokens that equal the token 288 steps earlier: ``mirror_acc``).

Seeds run side by side (``jax.vmap`` over their stacked params); programs compile in a thread pool
before they run. Results go to RUN/eval.json after every configuration, and a rerun skips the
configurations already there (resume).
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import inspect
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import adsa_jax
from adsa_jax.generate import Model

import classifier as judge
import data as lab_data
import train as lab_train

BUDGETS = (0.25, 256 / 576, 0.5, 0.75)  # 256 / 576: the paper's "ADSA-256" (0.44 would round to 253 tokens)
SAMPLING = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}  # generation settings, all policies
REPEAT_SAMPLES = 32


def policy_grid(kind: str = "full"):
    """[(policy name, granularity or None, budget or None, extra make_policy kwargs)], in priority order."""
    if kind == "smoke":
        return [("dense", None, None, {}), ("adsa-evict", "head", 0.5, {}), ("window", None, 0.5, {}),
                ("random", None, 0.5, {})]
    g = [("dense", None, None, {})]
    for b in BUDGETS:  # the paper's policy and the two baselines it must beat, first
        g += [("adsa-evict", "head", b, {}), ("adsa-evict", "layer", b, {}), ("window", None, b, {}),
              ("random", None, b, {}), ("random-uniform", None, b, {})]
    for b in BUDGETS:
        g += [("adsa-select", "head", b, {}), ("adsa-select", "layer", b, {}), ("adsa-evict-all", "head", b, {}),
              ("adsa-evict-all", "layer", b, {}), ("h2o", None, b, {}), ("line", None, b, {})]
    for b in BUDGETS:  # the eviction period: one lax.top_k of s tokens every s steps
        g += [("adsa-evict", "head", b, {"period": 8}), ("adsa-evict", "head", b, {"period": 24})]
    return g


def row_key(name, gran, budget, extra) -> str:
    ex = ",".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return f"{name}|{gran}|{budget}|{ex}"


def _kernel_kw(fn):
    """The XLA reference paths everywhere (the lab measures choices of tokens, not kernels)."""
    params = inspect.signature(fn).parameters
    if "options" in params:
        from adsa_jax.options import KernelConfig
        return {"options": KernelConfig(attention="xla", gemm="xla", kth="sort", cublas=False)}
    return {"attention": "xla"}


def _sampling_kw(fn, **s):
    params = inspect.signature(fn).parameters
    if "sampling" in params:
        return {"sampling": adsa_jax.SamplingConfig(**s)}
    return s


def build_policy(cfg, name, gran, budget, extra):
    if name == "dense":
        return adsa_jax.make_policy(cfg, "dense")
    kw = dict(extra)
    if gran is not None:
        kw["granularity"] = gran
    return adsa_jax.make_policy(cfg, name, budget=budget, **kw)


class Inputs:
    """What the evaluation reads from the data, independent of the weights."""

    def __init__(self, data_dir: Path, images: int, samples: int):
        z = np.load(data_dir / "tokens.npz")
        self.z = z
        self.codebook = lab_data.load_tokenizer(data_dir / "tokenizer.npz")
        self.repeat_class = int(z["repeat_class"])
        self.n_cls = self.repeat_class  # real classes 0..n_cls-1
        self.samples = samples
        self.ho_t = z["heldout_tokens"].astype(np.int32)[:images]
        self.ho_l = z["heldout_labels"].astype(np.int32)[:images]
        self.rp_t = z["repeat_tokens"].astype(np.int32)[:max(1, images // 4)]
        self.gen_labels = np.concatenate([np.arange(samples) % self.n_cls,
                                          np.full(REPEAT_SAMPLES, self.repeat_class)]).astype(np.int32)
        self.n_traj = min(64, samples)  # dense trajectories scored per seed
        rows_l = np.concatenate([self.ho_l, self.gen_labels[: self.n_traj], np.full(len(self.rp_t), self.repeat_class)])
        self.rows_l = rows_l.astype(np.int32)
        nh, nt = len(self.ho_t), self.n_traj
        self.seg_real, self.seg_traj, self.seg_rep = slice(0, nh), slice(nh, nh + nt), slice(nh + nt, None)


class Programs:
    """The evaluation's programs for one model config, seed count and data. ``start`` compiles them
    ahead of time from shapes, in threads, before the weights exist (while training runs)."""

    def __init__(self, cfg, S: int, inp: Inputs):
        self.cfg, self.S, self.inp = cfg, S, inp
        self.labels_j = jnp.asarray(inp.rows_l)
        self.half = cfg.num_image_tokens // 2
        self.gen_key = jax.random.key(1234)
        self.futures = {}
        self.pool = None

    def gen_prog(self, pol):
        """Seeds side by side: (S, ...) stacked bf16 params, labels (G,), key -> (S, G, N) tokens."""
        cfg = self.cfg

        def run_seeds(ps, labels, key):
            return jax.vmap(lambda p: adsa_jax.generate(
                Model(cfg, p), labels, key, policy=pol, **_sampling_kw(adsa_jax.generate, **SAMPLING),
                **_kernel_kw(adsa_jax.generate)))(ps)
        return jax.jit(run_seeds)

    def compile_gen(self, pol):
        labels = jax.ShapeDtypeStruct(self.inp.gen_labels.shape, jnp.int32)
        return self.gen_prog(pol).lower(self.shapes[0], labels, self.gen_key).compile()

    def generate(self, compiled, p16):
        return np.asarray(compiled(p16, jnp.asarray(self.inp.gen_labels), self.gen_key))  # (S, G, N)

    def score_fn(self, pol):
        cfg = self.cfg

        def one(p, toks, labels, ref_lp):
            logits = adsa_jax.score(Model(cfg, p), labels, toks, policy=pol, **_kernel_kw(adsa_jax.score))
            lp = jax.nn.log_softmax(logits, -1)  # (B, N, V)
            nll = -jnp.take_along_axis(lp, toks[..., None], -1)[..., 0]  # (B, N)
            kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), -1) if ref_lp is not None else jnp.zeros_like(nll)
            top1 = (jnp.argmax(lp, -1) == jnp.argmax(ref_lp, -1)) if ref_lp is not None else jnp.ones(nll.shape, bool)
            hit = jnp.argmax(lp, -1) == toks
            return nll, kl, top1, hit, lp
        return one

    def dense_prog(self, dense):
        one, labels_j = self.score_fn(dense), self.labels_j
        return jax.jit(lambda ps, ts: jax.vmap(lambda p, t: one(p, t, labels_j, None))(ps, ts))

    def metrics_prog(self, pol):
        one, labels_j, inp, half = self.score_fn(pol), self.labels_j, self.inp, self.half

        def run_all(ps, ts, ref):
            nll, kl, top1, hit, _ = jax.vmap(lambda p, t, r: one(p, t, labels_j, r))(ps, ts, ref)
            return (nll[:, inp.seg_real].mean(-1), kl[:, inp.seg_traj].mean((-1, -2)),
                    top1[:, inp.seg_traj].mean((-1, -2)), hit[:, inp.seg_rep, half:].mean((-1, -2)))
        return jax.jit(run_all)

    @functools.cached_property
    def shapes(self):
        """Abstract (stacked bf16 params, score rows, dense log-probs) of this config."""
        cfg, S = self.cfg, self.S
        one = jax.eval_shape(lambda k: lab_train.M.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
        p16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct((S,) + x.shape, x.dtype), one)
        B = len(self.inp.rows_l)
        N, V = cfg.num_image_tokens, cfg.vocab_size
        return (p16, jax.ShapeDtypeStruct((S, B, N), jnp.int32), jax.ShapeDtypeStruct((S, B, N, V), jnp.float32))

    def compile_metrics(self, pol):
        return self.metrics_prog(pol).lower(*self.shapes).compile()

    def compile(self, name, gran, budget, extra):
        """(generation, metrics) compiled ahead of time from shapes: no device work, no weights."""
        pol = build_policy(self.cfg, name, gran, budget, extra)
        if name == "dense":
            return self.compile_gen(pol), self.dense_prog(pol).lower(*self.shapes[:2]).compile()
        return self.compile_gen(pol), self.compile_metrics(pol)

    def start(self, grid: str, workers: int = 8, skip=(), log=print):
        """Compile every configuration of ``grid`` but those keyed in ``skip`` in ``workers`` threads;
        returns at once."""
        self.pool = cf.ThreadPoolExecutor(max_workers=workers)
        for item in policy_grid(grid):
            if row_key(*item) not in skip:
                self.futures[row_key(*item)] = self.pool.submit(self.compile, *item)
        log(f"evaluate: compiling {len(self.futures)} configurations in {workers} threads ahead of the weights")
        return self

    def stop(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def evaluate(data_dir: Path, run: Path, *, images: int = 256, samples: int = 100, grid: str = "full",
             time_limit: float = 560.0, classifier_steps: int = 3000, checkpoint: str = "best",
             programs: Programs | None = None, log=print) -> dict:
    """``programs``: from :meth:`Programs.start` (compiled while training ran), or None to compile here."""
    t_start = time.time()
    if not (run / "model.json").is_file():
        raise lab_data.DataError(f"{run} holds no trained model (no model.json): train it first "
                                 f"(lab.py train --run {run})")
    if programs is None:  # compile from the run's config while the weights load and the judge works
        meta = lab_data.read_json(run / "model.json", ("config", "seeds"))
        done = lab_data.read_json(run / "eval.json", ("rows",), default={"rows": {}})["rows"]
        programs = Programs(lab_train.GPTConfig.from_dict(meta["config"]), len(meta["seeds"]),
                            Inputs(data_dir, images, samples))
        programs.start(grid, skip=set(done) - {row_key("dense", None, None, {})}, log=log)
    try:
        return _evaluate(data_dir, run, programs, t_start, grid=grid, time_limit=time_limit,
                         classifier_steps=classifier_steps, checkpoint=checkpoint, log=log)
    finally:
        programs.stop()  # a compile still queued is dropped (an error, or the time limit)


def _evaluate(data_dir, run, programs, t_start, *, grid, time_limit, classifier_steps, checkpoint, log):
    cfg, params, meta = lab_train.load_trained(run, checkpoint)
    S = len(meta["seeds"])
    inp = programs.inp
    if programs.cfg != cfg or programs.S != S:
        raise lab_data.DataError(f"the precompiled programs are for {programs.S} seeds of another config than {run}")
    z, codebook, samples = inp.z, inp.codebook, inp.samples
    N = cfg.num_image_tokens
    half = N // 2
    ho_t, rp_t, gen_labels = inp.ho_t, inp.rp_t, inp.gen_labels
    out_file = run / "eval.json"
    res = lab_data.read_json(out_file, ("rows",), default={"rows": {}})
    if res["rows"] and res.get("evaluated_step", meta["evaluated_step"]) != meta["evaluated_step"]:
        raise lab_data.DataError(f"{out_file} holds rows of the step {res.get('evaluated_step')} checkpoint, not of "
                                 f"step {meta['evaluated_step']}: move it away to evaluate this one")
    res["evaluated_step"], res["evaluated_checkpoint"] = meta["evaluated_step"], meta["evaluated_checkpoint"]
    log(f"evaluate: the {meta['evaluated_checkpoint']} checkpoint, step {meta['evaluated_step']}")
    res.update(seeds=meta["seeds"], images=int(len(ho_t)), repeat_images=int(len(rp_t)), samples=samples,
               sampling=SAMPLING, model={"layers": cfg.n_layer, "width": cfg.dim, "params": meta["params"]})

    # --- the judge: trained on the tokenizer's reconstructions of the real training images
    cls_file = run / "classifier.npz"
    if not cls_file.is_file() and (data_dir / "classifier.npz").is_file():
        cls_file = data_dir / "classifier.npz"  # a judge trained once on this data, kept beside the tokens
    if cls_file.is_file():
        cparams, cacc = judge.load(cls_file)
    else:
        cparams, cacc = train_judge(z, codebook, cls_file, steps=classifier_steps, log=log)
    res["classifier_heldout_accuracy"] = cacc
    _, real_feats = judge.predict(cparams, lab_data.decode_tokens(z["heldout_tokens"].astype(np.int64), codebook))
    log(f"evaluate: classifier held-out accuracy {cacc:.3f}")

    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # (S, ...) stacked; bf16 like a user would sample

    # dense first: its samples are the trajectories, its log-probs the reference
    dense = build_policy(cfg, "dense", None, None, {})
    dense_key = row_key("dense", None, None, {})
    t0 = time.time()
    ahead = programs.futures.get(dense_key)
    dense_gen_prog, dense_run = ahead.result() if ahead is not None else programs.compile("dense", None, None, {})
    dense_gen = programs.generate(dense_gen_prog, p16)  # (S, G, N)
    log(f"evaluate: dense samples {dense_gen.shape} in {time.time() - t0:.1f} s (compile included)")
    traj = dense_gen[:, : inp.n_traj]  # (S, T, N) dense trajectories
    rows_t = np.stack([np.concatenate([ho_t, traj[s], rp_t]) for s in range(S)])  # (S, B, N)
    seg_real, seg_rep = inp.seg_real, inp.seg_rep

    d_nll, _, _, d_hit, d_lp = dense_run(p16, jnp.asarray(rows_t))
    d_nll_img = np.asarray(d_nll[:, seg_real].mean(-1))  # (S, nh)
    log(f"evaluate: dense held-out NLL per seed {np.round(d_nll_img.mean(1), 4).tolist()}")

    def finish(key, name, gran, budget, extra, pol, m, gen, secs):
        nll_img, kl, top1, mirror_tf = (np.asarray(x, np.float64) for x in m)
        ex = nll_img - d_nll_img  # (S, nh) paired excess per image
        per_seed = ex.mean(1)
        se = np.sqrt(np.mean(ex.var(1, ddof=1) / ex.shape[1]) / S) if name != "dense" else 0.0  # SE of the seed mean
        imgs = lab_data.decode_tokens(gen.reshape(-1, N).astype(np.int64), codebook)  # (S*G, px, px, 3)
        imgs = imgs.reshape(gen.shape[:2] + imgs.shape[1:])  # (S, G, px, px, 3)
        real_part = imgs[:, :samples].reshape((-1,) + imgs.shape[2:])
        pred, feats = judge.predict(cparams, real_part)
        acc = float(np.mean(pred == np.tile(gen_labels[:samples], S)))
        fd = judge.frechet(feats, real_feats)
        rep = gen[:, samples:]  # (S, R, N)
        mirror = float(np.mean(rep[:, :, half:] == rep[:, :, :half]))
        bytes_per_image = _kv_bytes(pol, cfg)  # bf16 K and V, two rows (CFG) per image
        row = {"policy": name if not extra else name + "".join(f" {k}={v}" for k, v in extra.items()),
               "base_policy": name, "granularity": gran, "budget": budget, **{k: v for k, v in extra.items()},
               "excess_nll": float(per_seed.mean()), "excess_nll_se": float(se),
               "excess_nll_per_seed": per_seed.tolist(), "seed_spread": float(per_seed.max() - per_seed.min()),
               "kl": float(kl.mean()), "top1": float(top1.mean()), "class_acc": acc, "feature_fd": fd,
               "mirror_acc": mirror, "mirror_top1": float(mirror_tf.mean()),
               "kv_bytes_per_image": bytes_per_image, "sizes": _sizes(pol), "seconds": round(secs, 1)}
        res["rows"][key] = row
        out_file.write_text(json.dumps(res, indent=1))
        np.save(run / f"excess_{_fname(key)}.npy", ex.astype(np.float32))  # (S, images): paired differences
        np.save(run / f"samples_{_fname(key)}.npy", gen[0, :16].astype(np.int16))  # seed 0's first samples (pictures)
        log(f"evaluate: {key:<40} excess {row['excess_nll']:+.4f} +- {se:.4f} KL {row['kl']:.4f} top1 {row['top1']:.3f} "
            f"acc {acc:.3f} FD {fd:.2f} mirror {mirror:.3f}/{row['mirror_top1']:.3f} ({secs:.1f} s)")

    if dense_key not in res["rows"]:
        finish(dense_key, "dense", None, None, {}, dense, (d_nll[:, seg_real].mean(-1), np.zeros(S), np.ones(S),
                                                         d_hit[:, seg_rep, half:].mean((-1, -2))), dense_gen, 0.0)

    todo = []
    for name, gran, budget, extra in policy_grid(grid):
        key = row_key(name, gran, budget, extra)
        if name == "dense" or key in res["rows"]:
            continue
        try:
            pol = build_policy(cfg, name, gran, budget, extra)
        except (ValueError, TypeError) as e:
            log(f"evaluate: skip {key}: {e}")
            res.setdefault("skipped", {})[key] = str(e)
            continue
        todo.append((key, name, gran, budget, extra, pol))

    ts_j = jnp.asarray(rows_t)

    def compile_one(item):
        key, name, gran, budget, extra, _ = item
        ahead = programs.futures.get(key)
        return ahead.result() if ahead is not None else programs.compile(name, gran, budget, extra)

    log(f"evaluate: {len(todo)} configurations, {sum(k in programs.futures for k, *_ in todo)} compiled ahead")
    ex = cf.ThreadPoolExecutor(max_workers=8)
    futures = [ex.submit(compile_one, it) for it in todo]
    for item, fut in zip(todo, futures):
        if time.time() - t_start > time_limit:
            log("evaluate: time limit reached; rerun to resume")
            res["stopped_early"] = True
            break
        try:
            gen_prog, m_prog = fut.result()
        except Exception as e:  # a policy that cannot build its program is reported, not fatal
            log(f"evaluate: {item[0]} failed to compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            res.setdefault("skipped", {})[item[0]] = f"{type(e).__name__}: {e}"[:500]
            continue
        t1 = time.time()
        m = m_prog(p16, ts_j, d_lp)
        gen = programs.generate(gen_prog, p16)
        finish(*item, m, gen, time.time() - t1)
    ex.shutdown(wait=False, cancel_futures=True)  # lab.py exits without joining a thread still compiling
    programs.stop()
    log(f"evaluate: {len(res['rows'])} rows in {time.time() - t_start:.0f} s")
    res["seconds"] = round(time.time() - t_start, 1)
    out_file.write_text(json.dumps(res, indent=1))
    return res


def train_judge(z, codebook, out: Path, *, steps: int = 3000, log=print):
    """Train the judge on the tokenizer's reconstructions of the real training images (the repeat
    class left out), save it to ``out``; returns (params, held-out accuracy)."""
    repeat_class = int(z["repeat_class"])
    tr_mask = z["train_labels"] < repeat_class
    tr_img = lab_data.decode_tokens(z["train_tokens"][tr_mask].astype(np.int64), codebook)
    ho_img = lab_data.decode_tokens(z["heldout_tokens"].astype(np.int64), codebook)
    log(f"judge: training the classifier on {len(tr_img)} real images, {steps} steps")
    params, acc = judge.train(tr_img, z["train_labels"][tr_mask], ho_img, z["heldout_labels"], repeat_class,
                              steps=steps, log=log)
    judge.save(out, params, acc)
    log(f"judge: held-out accuracy {acc:.3f} -> {out}")
    return params, acc


def _sizes(pol):
    return {k: getattr(pol, k) for k in ("prefix", "keep", "local", "period") if hasattr(pol, k)}


def _kv_bytes(pol, cfg) -> int:
    try:
        from adsa_jax.cache import kv_bytes
    except ImportError:
        from adsa_jax.policies import kv_bytes
    return int(kv_bytes(pol, cfg, 2, jnp.bfloat16))


def _fname(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in key)


if __name__ == "__main__":
    sys.exit("run through lab.py: python examples/fidelity/lab.py evaluate ...")
