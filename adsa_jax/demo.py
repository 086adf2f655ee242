"""The bundled demo: a small class-conditional LlamaGen GPT trained on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (1,797 real 8x8 handwritten digits, 10 classes, shipped
inside scikit-learn: nothing is downloaded), scaled to [0, 1], upscaled bilinearly to 16x16
so a sequence has 256 tokens (as LlamaGen at 256 px: a 16x16 token grid), with a fixed,
seeded, class-stratified 20 % held-out split (:func:`load_data`).

Tokenizer: a **fixed 16-level gray quantiser** (token k <-> gray level k/15; vocab = 16), not a
trained VQ. Why: the images are 1-channel and tiny, so one token per pixel is the natural
"patch"; a fixed quantiser needs no training, has no parameters to ship or version, and decodes
*exactly* (``encode(decode(t)) == t``), so every difference between two policies' images comes
from the GPT and none from a tokenizer. 16 levels keep the bilinear upscaling's soft edges
(the original digits have 17 levels, 0..16) while the vocabulary stays small enough that a
CPU-sized model learns it. Token order is LlamaGen's: row-major over the 16x16 grid.

scikit-learn is needed only to build the data (training, ``eval-demo``, tests): sampling the
bundled model (:func:`load_demo_model`, :func:`decode`) needs only this package.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import ConfigError, GPTConfig
from .options import KernelConfig, SamplingConfig

LEVELS = 16  # gray levels = vocabulary size
SIDE = 16  # image side in pixels = token grid side
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
NLL_SUBSET = 64  # the test's fixed held-out subset: the first 64 held-out images of the split
DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo_digits"
TRAIN_LOG = "train_log.json"
GOLDEN_TOKENS = "golden_tokens.npy"
# The golden-token run: fp32, this batch, this key, these sampling settings.
GOLDEN = {"classes": [0, 3, 7, 9], "seed": 0, "cfg_scale": 3.0, "top_k": 0, "temperature": 1.0}
DISPLAY_ZOOM = 4  # 16x16 digits are upscaled (nearest) by this factor in PNG grids
# Sampling defaults for this model (`adsa-jax sample` without --gpt, `eval-demo`): on 300 samples, CFG 2 with
# temperature 0.8 gave the most recognisable digits (CFG 3-4 at temperature 1, LlamaGen's ImageNet
# settings, give blotchier ones: a small model's errors compound over 256 steps). top-k 0: no filter.
DEMO_SAMPLING = {"cfg_scale": 2.0, "temperature": 0.8, "top_k": 0}


def demo_config(dim: int = 128, n_layer: int = 4, n_head: int = 2) -> GPTConfig:
    """The demo GPT: LlamaGen c2i with 2D RoPE on the 16x16 grid, class dropout 0.1 (CFG)."""
    return GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head, multiple_of=32, num_classes=NUM_CLASSES,
                     class_dropout_prob=0.1, model_type="c2i", vocab_size=LEVELS, cls_token_num=1,
                     block_size=SIDE * SIDE)


# ----------------------------------------------------------------------------- tokenizer


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation, half-pixel centres, edges clamped (PIL / torch
    ``align_corners=False`` bilinear)."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def upscale(images, side: int = SIDE) -> np.ndarray:
    """(N, h, w) floats -> (N, side, side) float64, bilinear."""
    x = np.asarray(images, np.float64)
    rows, cols = _interp_matrix(x.shape[1], side), _interp_matrix(x.shape[2], side)
    return np.einsum("ih,nhw,jw->nij", rows, x, cols)


def quantise(images01) -> np.ndarray:
    """Gray images in [0, 1], (N, 16, 16) -> int32 tokens (N, 256): level round(x * 15)."""
    x = np.asarray(images01, np.float64)
    if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE):
        raise ConfigError(f"images must have shape (N, {SIDE}, {SIDE}), got {x.shape}")
    q = np.clip(np.rint(x * (LEVELS - 1)), 0, LEVELS - 1).astype(np.int32)
    return q.reshape(len(q), SIDE * SIDE)


def tokens_to_unit(tokens) -> np.ndarray:
    """int tokens (N, 256) -> gray images (N, 16, 16) float32 in [0, 1]."""
    t = np.asarray(tokens)
    if t.ndim != 2 or t.shape[1] != SIDE * SIDE:
        raise ConfigError(f"demo tokens must have shape (N, {SIDE * SIDE}), got {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= LEVELS):
        raise ConfigError(f"demo tokens must be in [0, {LEVELS - 1}], got {t.min()}..{t.max()}")
    return (t.astype(np.float32) / (LEVELS - 1)).reshape(len(t), SIDE, SIDE)


def decode(tokens) -> np.ndarray:
    """Tokens (N, 256) -> images (N, 16, 16, 3) float32 in [-1, 1] (gray in all three channels),
    the decoder-output convention of :func:`adsa_jax.images.to_uint8`."""
    g = tokens_to_unit(tokens) * 2.0 - 1.0
    return np.repeat(g[..., None], 3, axis=-1)


def encode(images) -> np.ndarray:
    """Images in [-1, 1], (N, 16, 16) or (N, 16, 16, 3) (first channel used) -> tokens (N, 256).
    Exact inverse of :func:`decode` on decoded images."""
    x = np.asarray(images, np.float64)
    if x.ndim == 4:
        x = x[..., 0]
    return quantise((x + 1.0) / 2.0)


# ----------------------------------------------------------------------------- data


def _sklearn():
    try:
        import sklearn
    except ImportError:
        raise ConfigError("the demo data (training, eval-demo) needs scikit-learn: pip install 'adsa-jax[demo]' "
                          "(sampling the bundled model does not)") from None
    return sklearn  # the import is the check (returned: pyflakes ignores noqa)


DATA_KEYS = ("train_tokens", "train_labels", "heldout_tokens", "heldout_labels", "train_index", "heldout_index")


def load_data(path=None) -> dict:
    """Tokenised digits with the fixed held-out split: train/heldout tokens (N, 256) int32 and
    labels (N,) int32. Stratified by class, seed 0, 20 % held out (360 of 1,797 images).

    ``path``: an ``.npz`` written by :func:`save_data` instead of scikit-learn (the same arrays,
    for a machine without scikit-learn)."""
    if path is not None:
        return _read_data_file(path)
    _sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tokens = quantise(upscale(d.images / 16.0))
    labels = d.target.astype(np.int32)
    idx = np.arange(len(labels))
    tr, ho = train_test_split(idx, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    tr, ho = np.sort(tr), np.sort(ho)
    return {"train_tokens": tokens[tr], "train_labels": labels[tr], "heldout_tokens": tokens[ho],
            "heldout_labels": labels[ho], "train_index": tr, "heldout_index": ho}


def save_data(path) -> Path:
    """Write :func:`load_data`'s arrays to ``path`` (.npz, compressed, ~0.1 MB; needs scikit-learn)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"the demo data file must end in .npz, got {path}")
    np.savez_compressed(path, **load_data())
    return path


def _read_data_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"demo data file {path} not found (write one with demo.save_data / "
                          "`python examples/train_demo.py --save-data FILE.npz`)")
    with np.load(path) as z:
        missing = [k for k in DATA_KEYS if k not in z.files]
        if missing:
            raise ConfigError(f"{path} is not a demo data file: missing {', '.join(missing)}")
        d = {k: np.asarray(z[k]).astype(np.int64 if k.endswith("_index") else np.int32) for k in DATA_KEYS}
    for part in ("train", "heldout"):
        t, lab = d[f"{part}_tokens"], d[f"{part}_labels"]
        if t.ndim != 2 or t.shape[1] != SIDE * SIDE or lab.shape != (len(t),) or d[f"{part}_index"].shape != (len(t),):
            raise ConfigError(f"{path}: {part} arrays have inconsistent shapes {t.shape}, {lab.shape}")
        if t.size and (t.min() < 0 or t.max() >= LEVELS) or lab.size and (lab.min() < 0 or lab.max() >= NUM_CLASSES):
            raise ConfigError(f"{path}: {part} tokens or labels out of range")
    return d


# ----------------------------------------------------------------------------- the bundled model


def load_demo_model(directory=None, dtype: str | None = "float32"):
    """The bundled checkpoint (or one written by ``examples/train_demo.py --out DIR``)."""
    from .checkpoint import load

    directory = Path(directory) if directory is not None else DEMO_DIR
    if not (directory / "adsa_config.json").is_file():
        raise ConfigError(f"no demo checkpoint in {directory}; train one with `python examples/train_demo.py`")
    return load(directory, dtype=dtype)


def read_train_log(directory=None) -> dict:
    directory = Path(directory) if directory is not None else DEMO_DIR
    return json.loads((directory / TRAIN_LOG).read_text())


def nll_per_token(logits, tokens) -> float:
    """Mean negative log-likelihood (nats per token) of tokens (B, N) under logits (B, N, V)."""
    import jax
    import jax.numpy as jnp

    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    t = jnp.asarray(tokens, jnp.int32)
    return float(-jnp.take_along_axis(lp, t[..., None], -1).mean())


def dense_nll(model, labels, tokens, batch: int = 128) -> float:
    """Teacher-forced dense NLL per token through ``adsa_jax.forward`` (one causal pass)."""
    from .generate import forward

    tot, n = 0.0, 0
    for s in range(0, len(labels), batch):
        lg = forward(model, labels[s:s + batch], tokens[s:s + batch])
        tot += nll_per_token(lg, tokens[s:s + batch]) * len(labels[s:s + batch])
        n += len(labels[s:s + batch])
    return tot / n


def golden_tokens(model) -> np.ndarray:
    """The fixed run whose tokens are stored in ``golden_tokens.npy`` (use an fp32 model)."""
    import jax

    from .generate import generate

    g = GOLDEN
    sampling = SamplingConfig(cfg_scale=g["cfg_scale"], top_k=g["top_k"], temperature=g["temperature"])
    return np.asarray(generate(model, np.asarray(g["classes"], np.int32), jax.random.key(g["seed"]), sampling=sampling))


def display_uint8(tokens, zoom: int = DISPLAY_ZOOM) -> np.ndarray:
    """Tokens -> uint8 (N, 16*zoom, 16*zoom, 3) for PNG grids (nearest upscaling for visibility)."""
    from .images import to_uint8

    u8 = to_uint8(decode(tokens))
    return np.repeat(np.repeat(u8, zoom, axis=1), zoom, axis=2) if zoom > 1 else u8


# ----------------------------------------------------------------------------- quality benchmark


def digit_classifier(data):
    """An RBF SVC fitted on the real *held-out* images (quantised, 16x16, in [0, 1]): images the
    generator never saw. Returns (classifier, ceiling dict): its 5-fold cross-validated accuracy
    on the held-out images and its accuracy on the 1,437 training-split images (unseen by it)."""
    _sklearn()
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    x = tokens_to_unit(data["heldout_tokens"]).reshape(len(data["heldout_tokens"]), -1)
    y = data["heldout_labels"]
    make = lambda: SVC(C=10.0, gamma="scale")  # noqa: E731
    cv = cross_val_score(make(), x, y, cv=5)
    clf = make().fit(x, y)
    xt = tokens_to_unit(data["train_tokens"]).reshape(len(data["train_tokens"]), -1)
    other = float((clf.predict(xt) == data["train_labels"]).mean())
    return clf, {"classifier": "sklearn SVC(C=10, gamma='scale') on 16x16 quantised held-out images",
                 "heldout_cv5_accuracy": float(cv.mean()), "heldout_cv5_std": float(cv.std()),
                 "train_split_accuracy": other}


def classify_accuracy(clf, tokens, labels) -> float:
    x = tokens_to_unit(tokens).reshape(len(tokens), -1)
    return float((clf.predict(x) == np.asarray(labels)).mean())


def sample_key(policy: str, budget, seed: int) -> str:
    """Name of one policy / budget / seed's generated tokens in a ``--samples`` file."""
    return f"{policy}_{'1.00' if budget is None else f'{budget:.2f}'}_seed{seed}"


def quality_benchmark(model=None, *, policies=("dense", "adsa-select", "adsa-evict", "window", "random"),
                      budgets=(0.25, 0.5, 0.75), seeds=(0, 1, 2), per_seed: int = 100,
                      sampling: SamplingConfig = SamplingConfig(**DEMO_SAMPLING), heldout: int | None = None,
                      data=None, classify: bool = True, samples: dict | None = None, attention: str = "xla",
                      log=None) -> dict:
    """The demo model's quality under each policy and budget.

    Teacher forcing on the held-out images (the first ``heldout`` of them, default all 360; cfg 1,
    through the policy's cache with
    :func:`adsa_jax.score`): NLL per token, KL(dense || policy) per step and top-1 agreement with
    dense. Sampling: for each seed, ``per_seed`` images (class i % 10) from
    ``generate(key(seed), sampling=sampling, policy=...)``, scored by
    :func:`digit_classifier` against the requested class; mean and std over seeds.

    ``data``: :func:`load_data`'s dict (default: built with scikit-learn). ``classify=False`` skips
    the classifier (accuracies None; no scikit-learn needed): keep the generated tokens by passing
    a dict as ``samples`` (filled with :func:`sample_key` -> tokens) and score them later with
    :func:`classify_samples`. ``attention``: the decode attention of ``score`` and ``generate``
    (default ``'xla'``, the reference, on every device; the weight GEMMs then stay XLA's too).
    """
    import jax

    from .fidelity import kl_and_agreement
    from .generate import generate, score
    from .cache import make_policy

    log = log or (lambda m: None)
    model = load_demo_model() if model is None else model
    cfg = model.config
    data = load_data() if data is None else data
    ho_t, ho_l = data["heldout_tokens"][:heldout], data["heldout_labels"][:heldout]
    t0 = time.perf_counter()
    clf, ceiling = None, None
    if classify:
        clf, ceiling = digit_classifier(data)
        log(f"classifier: held-out 5-fold CV accuracy {ceiling['heldout_cv5_accuracy']:.3f}, "
            f"train-split accuracy {ceiling['train_split_accuracy']:.3f}")
    gen_labels = (np.arange(per_seed) % NUM_CLASSES).astype(np.int32)
    ref = None
    rows = []
    for name in policies:
        for budget in ([None] if name == "dense" else budgets):
            t1 = time.perf_counter()
            pol = make_policy(cfg, name, budget=budget)
            logits = score(model, ho_l, ho_t, policy=pol, options=KernelConfig(attention=attention))
            if ref is None and name == "dense":
                ref = logits
            if ref is None:
                ref = score(model, ho_l, ho_t, policy=make_policy(cfg, "dense"), options=KernelConfig(attention=attention))
            kl, agree = kl_and_agreement(ref, logits)
            accs = []
            for s in seeds:
                toks = np.asarray(generate(model, gen_labels, jax.random.key(s), sampling=sampling, policy=pol,
                                           options=KernelConfig(attention=attention,
                                                                gemm="xla" if attention == "xla" else "auto")))
                if samples is not None:
                    samples[sample_key(name, budget, s)] = toks.astype(np.uint8)
                if clf is not None:
                    accs.append(classify_accuracy(clf, toks, gen_labels))
            n = cfg.num_image_tokens
            row = {"policy": name, "budget": budget, "prefix": getattr(pol, "prefix", None),
                   "keep": getattr(pol, "keep", None), "local": getattr(pol, "local", None),
                   "cache_slots": pol.slots, "attended_per_step": float(np.mean([pol.attended(t) for t in range(n)])),
                   "heldout_nll": nll_per_token(logits, ho_t), "kl_mean": float(kl.mean()),
                   "kl_max_step": float(kl.max()), "top1_agreement": float(agree.mean()),
                   **_accuracy_fields(accs if clf is not None else None)}
            rows.append(row)
            acc = ("" if clf is None else
                   f" acc {row['class_accuracy_mean']:.3f}±{row['class_accuracy_std']:.3f}")
            log(f"{name:<12} {budget!s:>5}: NLL {row['heldout_nll']:.4f} KL {row['kl_mean']:.4f} "
                f"top-1 {row['top1_agreement']:.3f}{acc} ({time.perf_counter() - t1:.1f} s)")
    dev = jax.devices()[0]
    return {"rows": rows, "ceiling": ceiling,
            "settings": {"heldout_images": int(len(ho_l)), "seeds": list(seeds), "images_per_seed": per_seed,
                         "cfg_scale": sampling.cfg_scale, "top_k": sampling.top_k, "temperature": sampling.temperature,
                         "dtype": str(model.dtype), "granularity": "head", "attention": attention,
                         "matmul_precision": str(jax.config.jax_default_matmul_precision or "default")},
            "device": f"{dev.platform} ({dev.device_kind})", "date": time.strftime("%Y-%m-%d"),
            "versions": _versions(), "wall_s": round(time.perf_counter() - t0, 1)}


def _accuracy_fields(accs):
    if accs is None:
        return {"class_accuracy_mean": None, "class_accuracy_std": None, "class_accuracy_per_seed": None}
    return {"class_accuracy_mean": float(np.mean(accs)), "class_accuracy_std": float(np.std(accs)),
            "class_accuracy_per_seed": accs}


def classify_samples(result: dict, samples, data=None, log=None) -> dict:
    """Fill in the class accuracies of a :func:`quality_benchmark` result run with ``classify=False``
    from its saved samples (a dict or an ``.npz`` of :func:`sample_key` -> tokens). Returns a new
    result; the classifier is fitted here (scikit-learn), as in a one-step run."""
    log = log or (lambda m: None)
    if not isinstance(samples, dict):
        with np.load(samples) as z:
            samples = {k: z[k] for k in z.files}
    data = load_data() if data is None else data
    clf, ceiling = digit_classifier(data)
    st = result["settings"]
    labels = (np.arange(st["images_per_seed"]) % NUM_CLASSES).astype(np.int32)
    rows = []
    for r in result["rows"]:
        keys = [sample_key(r["policy"], r["budget"], s) for s in st["seeds"]]
        missing = [k for k in keys if k not in samples]
        if missing:
            raise ConfigError(f"the samples file has no {', '.join(missing)}: was it written by the same run?")
        accs = [classify_accuracy(clf, np.asarray(samples[k], np.int32), labels) for k in keys]
        rows.append({**r, **_accuracy_fields(accs)})
    out = dict(result, rows=rows, ceiling=ceiling)
    import platform
    out["classified_on"] = f"{platform.machine()} CPU, scikit-learn {_versions().get('scikit-learn')}"
    log(f"classified {len(rows)} rows x {len(st['seeds'])} seeds; ceiling {ceiling['heldout_cv5_accuracy']:.3f}")
    return out


def _versions():
    import jax

    out = {"jax": jax.__version__, "numpy": np.__version__}
    try:
        import sklearn
        out["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    return out


def format_quality(result) -> str:
    """Markdown table of :func:`quality_benchmark`'s rows."""
    head = ("| policy | budget | P/K/M | attended/step | held-out NLL | KL from dense | top-1 vs dense "
            "| class accuracy (mean ± std over seeds) |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        sizes = "-" if r["prefix"] is None else f"{r['prefix']}/{r['keep']}/{r['local']}"
        b = "1.00" if r["budget"] is None else f"{r['budget']:.2f}"
        acc = ("not classified" if r["class_accuracy_mean"] is None else
               f"{r['class_accuracy_mean']:.3f} ± {r['class_accuracy_std']:.3f}")
        lines.append(f"| {r['policy']} | {b} | {sizes} | {r['attended_per_step']:.1f} | {r['heldout_nll']:.4f} | "
                     f"{r['kl_mean']:.4f} | {r['top1_agreement']:.3f} | {acc} |")
    c = result["ceiling"]
    if c is None:
        return "\n".join(lines)
    lines.append(f"| real held-out images (classifier ceiling) | | | | | | | {c['heldout_cv5_accuracy']:.3f} ± "
                 f"{c['heldout_cv5_std']:.3f} (5-fold CV); {c['train_split_accuracy']:.3f} on the train split |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- `adsa-jax sample` without --gpt


def _labeled_grid(u8, nrow, title):
    """make_grid plus a title strip above it (PIL's built-in bitmap font)."""
    from PIL import Image, ImageDraw

    from .images import make_grid

    g = make_grid(u8, nrow=nrow)
    strip = Image.new("RGB", (g.shape[1], 14), (0, 0, 0))
    ImageDraw.Draw(strip).text((3, 1), title, fill=(255, 255, 255))
    return np.concatenate([np.asarray(strip), g], axis=0)


def sample_demo(model, labels, key, *, sampling: SamplingConfig = SamplingConfig(**DEMO_SAMPLING), policy=None,
                options: KernelConfig | None = None, side_by_side: bool = False, out=None, out_dir=None,
                tokens_out=None, nrow: int | None = None, log=print):
    """Sample the bundled digits model (``load_demo_model``) and write what is asked for: a PNG grid
    (``out``), one PNG per image (``out_dir``), the tokens as .npy (``tokens_out``).

    labels: (B,) digit classes; key: ``jax.random.key(seed)``; sampling: default the demo model's
    own (:data:`DEMO_SAMPLING`); policy: a policy for ``model.config`` (None: dense); options: a
    KernelConfig. ``side_by_side`` puts dense (left) and ``policy`` (right) images of the same
    seeds in one grid. nrow: images per grid row (default: up to one per class). Returns the
    tokens (B, 256) int32."""
    from .generate import generate
    from .images import _save_png, _writable_file, make_grid

    labels = np.asarray(labels, np.int32)
    name = "dense" if policy is None else policy.name
    if side_by_side and name == "dense":
        raise ConfigError("--side-by-side compares dense with another policy: add e.g. --policy adsa-evict --budget 0.5")
    if out:
        _writable_file(out)
    cfg = model.config
    log(f"demo model (sklearn digits, {cfg.n_layer} layers x {cfg.dim}, 16x16 tokens, {model.dtype}): "
        f"{len(labels)} images, policy {name}" + (" beside dense" if side_by_side else "") +
        f"; cfg {sampling.cfg_scale:g}, temperature {sampling.temperature:g}, top-k {sampling.top_k}")
    log("compiling and sampling (the first call compiles) ...")
    t0 = time.perf_counter()
    kw = dict(sampling=sampling, options=options)
    tokens = np.asarray(generate(model, labels, key, policy=policy, **kw))
    dense = np.asarray(generate(model, labels, key, policy=None, **kw)) if side_by_side else None
    log(f"sampled in {time.perf_counter() - t0:.1f} s (including compilation)")
    nrow = nrow or min(len(labels), NUM_CLASSES)
    if tokens_out:
        np.save(tokens_out, tokens)
        log(f"tokens -> {tokens_out} {tokens.shape} int32")
    if out:
        u8 = display_uint8(tokens)
        if dense is None:
            grid = make_grid(u8, nrow=nrow)
        else:
            n = cfg.num_image_tokens
            kept = policy.attended(n - 1) - cfg.cls_token_num  # image tokens a late step attends to
            left = _labeled_grid(display_uint8(dense), nrow, "dense")
            right = _labeled_grid(u8, nrow, f"{name} {kept}/{n} tokens")
            gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
            grid = np.concatenate([left, gap, right], axis=1)
        _save_png(grid, Path(out))
        log(f"grid -> {out}" + (" (left: dense, right: " + name + ")" if dense is not None else ""))
    if out_dir:
        from .images import save_pngs
        save_pngs(display_uint8(tokens), out_dir, [f"{i:06d}.png" for i in range(len(tokens))])
        log(f"{len(tokens)} PNGs -> {out_dir}")
    return tokens
