"""``adsa-jax`` command line: argument parsing and progress output only; the work is in the library."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError
from .options import KernelConfig, SamplingConfig

DEMO_CLASSES = "207,360,387,974,88,979,417,279"  # LlamaGen sample_c2i.py's labels


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- convert


def add_convert_args(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpt", help="LlamaGen GPT .pt -> adsa_jax directory")
    g.add_argument("src", help="LlamaGen checkpoint (.pt / .pth), e.g. c2i_XL_384.pt")
    g.add_argument("--model", required=True, help="GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-1B, GPT-3B, GPT-7B, "
                   "or a JSON file of LlamaGen ModelArgs fields")
    g.add_argument("--image-size", type=int, default=None,
                   help="resolution the checkpoint was trained at (256, 384, 512): it sets the 2D RoPE grid "
                        "(image_size // 16) and cannot be read from the weights")
    g.add_argument("--type", dest="model_type", choices=("c2i", "t2i"), default="c2i")
    g.add_argument("--dtype", default=None, help="stored dtype: float32, float16 or bfloat16 (default: as in the file)")
    g.add_argument("--ema", action="store_true", help="use the 'ema' weights of a training checkpoint")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    v = sub.add_parser("vq", help="LlamaGen VQ tokenizer .pt -> adsa_jax directory")
    v.add_argument("src")
    v.add_argument("--preset", default="VQ-16", choices=("VQ-16", "VQ-8"))
    v.add_argument("--ch", type=int, default=None, help="base channels (128 in the released tokenizers)")
    v.add_argument("--ch-mult", default=None, help="comma-separated channel multipliers, e.g. 1,1,2,2,4")
    v.add_argument("--z-channels", type=int, default=None)
    v.add_argument("--codebook-size", type=int, default=None)
    v.add_argument("--codebook-dim", type=int, default=None)
    v.add_argument("--dtype", default=None)
    v.add_argument("--ema", action="store_true")
    v.add_argument("--out", required=True)
    v.add_argument("--force", action="store_true")


def run_convert(a):
    if a.what == "gpt":
        from convert.gpt import convert_gpt
        from .config import config_from_arg

        cfg = config_from_arg(a.model, image_size=a.image_size, model_type=a.model_type)
        params = convert_gpt(a.src, cfg, a.out, image_size=a.image_size, dtype=a.dtype, prefer_ema=a.ema,
                             overwrite=a.force)
        import jax
        n = sum(x.size for x in jax.tree.leaves(params))
        _log(f"wrote {a.out}: {a.model} {cfg.model_type}, grid {cfg.grid}x{cfg.grid}, {n:,} values, "
             f"dtype {jax.tree.leaves(params)[0].dtype}")
    else:
        from convert.vq import convert_vq, vq_arg_config

        ch_mult = tuple(int(x) for x in a.ch_mult.split(",")) if a.ch_mult else None
        cfg = vq_arg_config(ch=a.ch, ch_mult=ch_mult, z_channels=a.z_channels, codebook_size=a.codebook_size,
                            codebook_embed_dim=a.codebook_dim, preset=a.preset)
        convert_vq(a.src, a.out, cfg=cfg, dtype=a.dtype, prefer_ema=a.ema, overwrite=a.force)
        _log(f"wrote {a.out}: VQ tokenizer, codebook {cfg.codebook_size}x{cfg.codebook_embed_dim}")


# ----------------------------------------------------------------------------- sampling


def add_sampling_args(p):
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale; <= 1 turns CFG off")
    p.add_argument("--cfg-interval", type=float, default=-1, help="guide only the first cfg_interval+2 tokens (-1: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=2000, help="0 turns it off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 turns it off")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 (default) or float32")


def add_policy_args(p):
    from .cache import POLICY_NAMES

    p.add_argument("--policy", default="dense", help=", ".join(POLICY_NAMES))
    p.add_argument("--budget", type=float, default=None, help="fraction of image tokens kept (default sizes: "
                   "prefix = one grid row, local = two rows, keep = the rest)")
    p.add_argument("--prefix", type=int, default=None)
    p.add_argument("--keep", type=int, default=None)
    p.add_argument("--local", type=int, default=None)
    p.add_argument("--granularity", choices=("head", "layer"), default="head")
    p.add_argument("--period", type=int, default=1, help="eviction period s of adsa-evict, adsa-evict-all and "
                   "random: s tokens leave the local window together every s steps (default 1)")


def _policy_kw(a):
    return dict(budget=a.budget, prefix=a.prefix, keep=a.keep, local=a.local, granularity=a.granularity,
                period=a.period)


def parse_classes(text, num_classes):
    try:
        ids = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ConfigError(f"class ids {bad} are outside [0, {num_classes - 1}] for this model")
    return np.asarray(ids, np.int32)


def default_classes(num_classes):
    """LlamaGen's demo labels for ImageNet models; the first 8 classes of smaller label sets."""
    return DEMO_CLASSES if num_classes >= 1000 else ",".join(str(i) for i in range(min(8, num_classes)))


def balanced_labels(num_samples, num_classes):
    """Class-balanced labels: image i gets class i % num_classes (as LlamaGen's FID runs on average)."""
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def load_caption_embs(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"caption embeddings file not found: {path}")
    z = np.load(path)
    emb_key = next((k for k in ("caption_embs", "embeddings") if k in z), None)
    mask_key = next((k for k in ("emb_masks", "masks") if k in z), None)
    if emb_key is None or mask_key is None:
        raise ConfigError(f"{path} must hold 'caption_embs' (or 'embeddings') and 'emb_masks' (or 'masks'); "
                          f"found {list(z.keys())}")
    return np.asarray(z[emb_key], np.float32), np.asarray(z[mask_key])


def read_prompts(a):
    """--prompt values, then the lines of --prompts-file (stripped; blank lines skipped)."""
    prompts = list(a.prompt or [])
    if a.prompts_file:
        path = Path(a.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts file not found: {path}")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        file_prompts = [ln for ln in lines if ln]
        if not file_prompts:
            raise ConfigError(f"prompts file {path} has no prompts (one per line)")
        prompts += file_prompts
    if any(not p.strip() for p in prompts):
        raise ConfigError("empty --prompt given")
    return prompts


def t2i_condition(a, cfg):
    """Caption features (B, c, C) float32 and masks (B, c) from --caption-embs or prompts (+ --t5)."""
    if a.classes is not None:
        raise ConfigError(f"{a.gpt} is a text-to-image (t2i) model: it takes --prompt / --prompts-file "
                          "(with --t5) or --caption-embs, not --classes")
    prompts = read_prompts(a)
    c, width = cfg.cls_token_num, cfg.caption_dim
    if a.caption_embs:
        if prompts:
            raise ConfigError("give either text prompts (--prompt / --prompts-file) or --caption-embs, not both")
        emb, masks = load_caption_embs(a.caption_embs)
        if emb.ndim != 3 or emb.shape[1] != c or emb.shape[2] != width:
            got = f"width {emb.shape[-1]}" if emb.ndim == 3 and emb.shape[1] == c else f"shape {emb.shape}"
            raise ConfigError(f"caption embeddings in {a.caption_embs} have {got}, but this model needs "
                              f"(B, {c}, {width}) (caption_dim {width}); they were made by a different text encoder")
        if masks.shape != emb.shape[:2]:
            raise ConfigError(f"emb_masks in {a.caption_embs} has shape {masks.shape}, expected {emb.shape[:2]}")
        return emb, masks
    if not prompts:
        raise ConfigError("t2i models need a caption source: --prompt TEXT (repeatable) or --prompts-file FILE, "
                          "with --t5 PATH (local flan-t5-xl directory), or --caption-embs FILE.npz "
                          "(caption_embs, emb_masks)")
    import warnings

    from .text import T5NotInstalledError, encode_prompts, release_t5, t5_width

    if not a.t5:
        raise ConfigError("text prompts need the T5 encoder: pass --t5 PATH (a local Hugging Face flan-t5-xl "
                          "directory), or precomputed features with --caption-embs FILE.npz")
    d = t5_width(a.t5)
    if d != width:
        raise ConfigError(f"the T5 encoder in {a.t5} produces width {d} (d_model) but this model's caption_dim is "
                          f"{width}; LlamaGen's t2i models use flan-t5-xl (2048)")
    _log(f"encoding {len(prompts)} prompt(s) with the T5 encoder in {a.t5} ...")
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            emb, masks = encode_prompts(prompts, a.t5, max_length=c, left_padding=not a.no_left_padding,
                                        dtype=a.dtype)
    except T5NotInstalledError as e:
        raise ConfigError(str(e)) from None
    finally:
        release_t5()  # the GPU memory goes back to sampling
    for w in caught:
        _log(f"warning: {w.message}")
    _log(f"prompts encoded in {time.perf_counter() - t0:.2f} s")
    return emb, masks


def run_sample(a):
    import jax

    from .checkpoint import load
    from .cache import make_policy
    from .generate import generate

    if a.gpt is None:  # the bundled demo model (sklearn digits) and its gray-level quantiser
        from .demo import sample_demo
        return sample_demo(a, log=_log)
    if a.side_by_side:
        raise ConfigError("--side-by-side is for the bundled demo model (no --gpt)")
    for k, v in (("cfg_scale", 4.0), ("temperature", 1.0), ("top_k", 2000)):  # LlamaGen's sample_c2i.py defaults
        if getattr(a, k) is None:
            setattr(a, k, v)
    from .runs import initialize_distributed, mesh_from_args
    from .sharding import to_host
    if a.distributed:  # before anything touches a device
        initialize_distributed(a.coordinator_address, a.num_processes, a.process_id)
    mesh = mesh_from_args(a.data_parallel, a.tensor_parallel)  # None on one device: the plain path
    model = load(a.gpt, dtype=a.dtype, mesh=mesh)  # restored straight into the mesh's shardings
    cfg = model.config
    vq = None
    if a.vq:
        from .vq import load_vq
        vq = load_vq(a.vq)
        if vq.config.codebook_size != cfg.vocab_size:
            raise ConfigError(f"the GPT's vocabulary ({cfg.vocab_size}) does not match the VQ codebook "
                              f"({vq.config.codebook_size}); use the tokenizer the GPT was trained with")
    if (a.out or a.out_dir) and vq is None:
        raise ConfigError("image output (--out, --out-dir) needs the tokenizer: pass --vq DIR "
                          "(--npz without --vq stores tokens)")
    if cfg.model_type == "t2i":
        cond_all, mask_all = t2i_condition(a, cfg)
        if a.num_samples is not None:  # cycle through the captions
            idx = np.arange(a.num_samples) % cond_all.shape[0]
            cond_all, mask_all = cond_all[idx], mask_all[idx]
        labels = None
    else:
        if a.prompt or a.prompts_file or a.caption_embs or a.t5:
            raise ConfigError(f"{a.gpt} is a class-conditional (c2i) model: it takes --classes, not text prompts, "
                              "--caption-embs or --t5")
        if a.num_samples is not None and a.classes is None:
            cond_all = balanced_labels(a.num_samples, cfg.num_classes)
        else:
            cond_all = parse_classes(a.classes or default_classes(cfg.num_classes), cfg.num_classes)
            if a.num_samples is not None:
                cond_all = np.resize(cond_all, a.num_samples)
        mask_all, labels = None, cond_all
    for p in (a.out, a.tokens_out):  # fail before a long run, not after it
        _check_writable(p)
    _check_writable(a.npz, create=True)  # --npz makes its directories (adsa_jax.runs)
    n = cond_all.shape[0]
    policy = make_policy(cfg, a.policy or "dense", **{k: v for k, v in _policy_kw(a).items() if v is not None and
                                                      not (k == "granularity" and v == "head")})
    bs = a.batch_size or n
    key = jax.random.key(a.seed)
    sampling = SamplingConfig(cfg_scale=a.cfg_scale, cfg_interval=a.cfg_interval, temperature=a.temperature,
                              top_k=a.top_k, top_p=a.top_p)
    kw = dict(sampling=sampling, policy=policy,
              options=KernelConfig(attention=a.attention, gemm=a.gemm, segments=a.segments))
    if mesh is not None:
        _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices ({jax.process_count()} processes)")
    if a.npz:  # large runs: resumable batches in NPZ.parts/, merged into NPZ (adsa_jax.runs)
        return _sample_npz(a, model, cond_all, mask_all, labels, key, kw, vq, mesh)
    tokens, images = [], []
    _log(f"model {cfg.n_layer} layers x {cfg.dim}, grid {cfg.grid}x{cfg.grid}, {model.dtype}, policy {policy.name}; "
         f"{n} images in batches of {bs}")
    t_start = time.perf_counter()
    writer = jax.process_index() == 0  # several hosts: each holds all tokens, process 0 writes the files
    for i, s in enumerate(range(0, n, bs)):
        cond = cond_all[s:s + bs]
        cmask = None if mask_all is None else mask_all[s:s + bs]
        t0 = time.perf_counter()
        if i == 0:
            _log("compiling and sampling the first batch ...")
        tok = to_host(generate(model, cond, key, cond_mask=cmask, example_ids=np.arange(s, s + len(cond)),
                               mesh=mesh, **kw))  # other hosts' rows gathered
        dt = time.perf_counter() - t0
        tokens.append(tok)
        msg = f"batch {i + 1}: {len(cond)} images sampled in {dt:.2f} s"
        if vq is not None and writer:
            from .vq import decode_codes
            t1 = time.perf_counter()
            images.append(np.asarray(decode_codes(vq, tok)))
            msg += f", decoded in {time.perf_counter() - t1:.2f} s"
        _log(msg)
    tokens = np.concatenate(tokens)
    total = time.perf_counter() - t_start
    _log(f"done: {n} images in {total:.1f} s ({n / total:.2f} images/s including compilation)")
    if a.tokens_out and writer:
        _save_npy(a.tokens_out, tokens)
        _log(f"tokens -> {a.tokens_out} {tokens.shape} int32")
    if images:
        from .images import to_uint8
        _write_images(a, to_uint8(np.concatenate(images)))
    return tokens


def _write_images(a, u8):
    """--out (grid) and --out-dir (one PNG per image) from uint8 images (N, H, W, 3)."""
    from .images import save_png_grid, save_pngs

    if a.out:
        save_png_grid(u8, a.out)
        _log(f"grid -> {a.out}")
    if a.out_dir:
        save_pngs(u8, a.out_dir, [f"{i:06d}.png" for i in range(len(u8))])
        _log(f"{len(u8)} PNGs -> {a.out_dir}")


def _sample_npz(a, model, cond_all, mask_all, labels, key, kw, vq, mesh):
    """--npz: batches written to NPZ.parts/ as they finish (resumable), then merged (adsa_jax.runs)."""
    from .runs import read_parts, sample_to_npz

    n = cond_all.shape[0]
    bs = a.batch_size or min(n, 64)
    settings = {"seed": a.seed, "gpt": model.config.to_dict(), "dtype": str(model.dtype), "policy": repr(kw["policy"]),
                "sampling": dataclasses.asdict(kw["sampling"]),
                "vq": None if vq is None else vq.config.to_dict()}
    path = sample_to_npz(model, cond_all, key, a.npz, batch_size=bs, cond_mask=mask_all, labels=labels, vq=vq,
                         mesh=mesh, max_batches=a.max_batches, settings=settings, log=_log, **kw)
    if path is None:
        return None
    if a.tokens_out:
        tokens = read_parts(a.npz, "tokens")
        _save_npy(a.tokens_out, tokens)
        _log(f"tokens -> {a.tokens_out} {tokens.shape} int32")
    if vq is not None and (a.out or a.out_dir):
        with np.load(path) as z:
            _write_images(a, z["arr_0"])
    return path


def run_merge(a):
    from .runs import merge

    return merge(a.npz, a.parts, log=_log)


def _check_writable(path, create=False):
    """Raise a clear error now if `path` cannot be written (create: missing directories are made later)."""
    import os

    if path is None:
        return
    parent = Path(path).absolute().parent
    if create:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: directory {parent} is not writable")


def _save_npy(path, arr):
    path = Path(path)
    try:
        np.save(path, arr)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- compare


def run_compare(a):
    import jax

    from .checkpoint import load
    from .fidelity import compare_policies, format_table

    model = load(a.gpt, dtype=a.dtype)
    cfg = model.config
    if a.tokens:
        tokens = np.load(a.tokens)
        labels = parse_classes(a.classes, cfg.num_classes) if a.classes else balanced_labels(len(tokens), cfg.num_classes)
    else:
        labels = parse_classes(a.classes or default_classes(cfg.num_classes), cfg.num_classes)
        tokens = None
    rows = compare_policies(model, labels, tokens=tokens, policies=a.policies.split(","),
                            budgets=[float(b) for b in a.budgets.split(",")], key=jax.random.key(a.seed),
                            prefix=a.prefix, local=a.local, granularity=a.granularity,
                            sampling=SamplingConfig(cfg_scale=a.cfg_scale, top_k=a.top_k))
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
        _log(f"json -> {a.json}")
    return rows


# ----------------------------------------------------------------------------- main


def build_parser():
    p = argparse.ArgumentParser(prog="adsa-jax", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_convert_args(sub.add_parser("convert", help="convert LlamaGen PyTorch checkpoints"))

    s = sub.add_parser("sample", help="sample images (tokens, PNG grid, PNGs, .npz)")
    s.add_argument("--gpt", default=None, help="GPT directory from `adsa-jax convert gpt` (default: the bundled "
                   "demo model, sklearn digits 16x16, with its own quantiser; --out defaults to samples.png)")
    s.add_argument("--side-by-side", action="store_true", help="demo model: dense (left) and --policy (right) "
                   "images of the same seeds in one grid")
    s.add_argument("--vq", default=None, help="VQ directory from `adsa-jax convert vq` (for images)")
    s.add_argument("--classes", default=None, help=f"comma-separated class ids (default {DEMO_CLASSES})")
    s.add_argument("--caption-embs", default=None, help="t2i: .npz with caption_embs (B,120,C) and emb_masks (B,120)")
    s.add_argument("--prompt", action="append", default=None, help="t2i: a text prompt (repeatable); needs --t5")
    s.add_argument("--prompts-file", default=None, help="t2i: UTF-8 text file, one prompt per line (blank lines skipped)")
    s.add_argument("--t5", default=None, help="t2i: local Hugging Face T5 model directory (flan-t5-xl) that encodes "
                   "--prompt / --prompts-file; needs the extra: pip install 'adsa-jax[t5]'")
    s.add_argument("--no-left-padding", action="store_true", help="t2i prompts: keep T5's right padding "
                   "(LlamaGen's --no-left-padding; the released models expect left padding)")
    s.add_argument("--num-samples", type=int, default=None, help="number of images (class-balanced without --classes)")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--segments", type=int, default=1, help="static length buckets of the decode scan (speed, "
                   "XLA attention)")
    s.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"),
                   help="decode attention: auto = the Pallas kernel on GPU, XLA elsewhere")
    s.add_argument("--gemm", default="auto", choices=("auto", "xla", "pallas"),
                   help="decode weight GEMMs: auto = a Pallas GEMV (and one residual add + RMSNorm kernel after wo and w2) on one GPU at batch 1-8 (bf16), XLA elsewhere")
    add_sampling_args(s)
    # unset: LlamaGen's cfg 4.0 / temperature 1.0 / top-k 2000 with --gpt, the demo model's own (demo.DEMO_SAMPLING) without
    s.set_defaults(cfg_scale=None, temperature=None, top_k=None)
    add_policy_args(s)
    s.add_argument("--tokens-out", default=None, help="write the (N, h*w) int32 tokens as .npy")
    s.add_argument("--out", default=None, help="PNG grid of the images")
    s.add_argument("--out-dir", default=None, help="one PNG per image")
    s.add_argument("--npz", default=None, help="arr_0: uint8 images (N,H,W,3) for the ImageNet FID evaluator (tokens "
                   "without --vq), arr_1: labels. Resumable: finished batches go to NPZ.parts/ (rerun to resume)")
    s.add_argument("--max-batches", type=int, default=None, help="with --npz: stop after this many new batches")
    s.add_argument("--data-parallel", type=int, default=None, help="data axis of the mesh (default: all devices / "
                   "--tensor-parallel); batches are split over it")
    s.add_argument("--tensor-parallel", type=int, default=1, help="model axis of the mesh: shard heads and FFN "
                   "hidden over this many devices (models too large for one device)")
    s.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() "
                   "first (auto-detected on TPU pods / SLURM; elsewhere give the three options below)")
    s.add_argument("--coordinator-address", default=None, help="with --distributed: HOST:PORT of process 0")
    s.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of hosts")
    s.add_argument("--process-id", type=int, default=None, help="with --distributed: this host's index")

    m = sub.add_parser("merge", help="merge the part files of a (multi-host) --npz run into the .npz")
    m.add_argument("npz", help="the run's --npz output; parts are read from NPZ.parts/ (without .npz)")
    m.add_argument("--parts", default=None, help="parts directory (default: next to the output)")

    c = sub.add_parser("compare", help="KV memory and fidelity to dense of each policy and budget")
    c.add_argument("--gpt", required=True)
    c.add_argument("--policies", default="dense,adsa-evict,adsa-select,window,random")
    c.add_argument("--budgets", default="0.25,0.5,0.75")
    c.add_argument("--classes", default=None)
    c.add_argument("--tokens", default=None, help=".npy of (B, N) tokens to score (default: generate them densely)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--prefix", type=int, default=None, help="override the default prefix (one grid row)")
    c.add_argument("--local", type=int, default=None, help="override the default local window (two grid rows)")
    c.add_argument("--granularity", choices=("head", "layer"), default="head")
    c.add_argument("--cfg-scale", type=float, default=4.0)
    c.add_argument("--top-k", type=int, default=2000)
    c.add_argument("--dtype", default="float32")
    c.add_argument("--json", default=None, help="also write the rows as JSON")

    e = sub.add_parser("eval-demo", help="quality of each policy on the bundled demo model (held-out NLL, KL, "
                       "top-1, classifier accuracy of samples); needs scikit-learn")
    e.add_argument("--gpt", default=None, help="demo checkpoint directory (default: the bundled one)")
    e.add_argument("--policies", default="dense,adsa-select,adsa-evict,window,random")
    e.add_argument("--budgets", default="0.25,0.5,0.75")
    e.add_argument("--seeds", default="0,1,2", help="sampling seeds (accuracy: mean and std over them)")
    e.add_argument("--per-seed", type=int, default=50, help="generated images per seed (class i %% 10); "
                   "BENCHMARKS.md used 100")
    e.add_argument("--heldout", type=int, default=120, help="score the first this many of the 360 held-out "
                   "images (0: all, as BENCHMARKS.md; adsa-select is slow on CPU)")
    e.add_argument("--cfg-scale", type=float, default=2.0)
    e.add_argument("--top-k", type=int, default=0)
    e.add_argument("--temperature", type=float, default=0.8)
    e.add_argument("--json", default="demo_quality.json", help="write the rows here ('' to skip)")
    e.add_argument("--data", default=None, help="the tokenised digits from an .npz written by `python "
                   "examples/train_demo.py --save-data FILE.npz` instead of scikit-learn")
    e.add_argument("--samples", default=None, help="write every generated token array here (.npz, one entry "
                   "per policy/budget/seed); with --rescore, read them from here")
    e.add_argument("--no-classify", action="store_true", help="skip the scikit-learn classifier (accuracy "
                   "left empty; needs --samples): classify later with --rescore")
    e.add_argument("--rescore", default=None, metavar="RESULT.json", help="generate nothing: fill in the class "
                   "accuracies of a --no-classify run's JSON from its --samples file, print the table, write --json")
    e.add_argument("--attention", default="xla", choices=("xla", "auto", "pallas"),
                   help="decode attention (default xla, the reference, so every device measures the same thing)")

    b = sub.add_parser("bench", help="speed, memory and roofline of generate (random weights of named sizes or "
                       "JSON configs, or a converted checkpoint)")
    b.add_argument("--model", default=None, help="comma-separated named sizes (e.g. GPT-B,GPT-XL; default GPT-B) "
                   "and/or JSON files of LlamaGen ModelArgs fields, run with random weights")
    b.add_argument("--checkpoint", default=None, metavar="DIR", help="GPT directory from `adsa-jax convert gpt`: "
                   "benchmark its weights at its own image size (instead of --model)")
    b.add_argument("--image-size", default=None, help="comma-separated, e.g. 256,384 (default: 256 for named sizes, "
                   "the block_size of a JSON config, the checkpoint's own size)")
    b.add_argument("--type", dest="model_type", choices=("c2i", "t2i"), default=None,
                   help="named sizes: class- (default) or text-conditional (t2i runs on zero caption features)")
    b.add_argument("--batch", default="1,8", help="comma-separated batch sizes (images; CFG doubles the rows)")
    b.add_argument("--policies", default="dense")
    b.add_argument("--budgets", default="0.5")
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--iters", type=int, default=3)
    b.add_argument("--segments", type=int, default=4, help="static length buckets of the dense decode scan")
    b.add_argument("--cfg-scale", type=float, default=4.0)
    b.add_argument("--top-k", type=int, default=2000)
    b.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"),
                   help="decode attention: auto = the Pallas kernel on GPU, XLA elsewhere")
    b.add_argument("--gemm", default="auto", choices=("auto", "xla", "pallas"),
                   help="decode weight GEMMs: auto = a Pallas GEMV (and one residual add + RMSNorm kernel after wo and w2) on one GPU at batch 1-8 (bf16), XLA elsewhere")
    b.add_argument("--compile-workers", type=int, default=1, help="compile this many configurations at once "
                   "(threads; compile times then overlap)")
    b.add_argument("--no-roofline", action="store_true", help="skip measuring bandwidth and matmul rate")
    b.add_argument("--json", default=None)
    return p


def run_bench(a):
    from .bench import format_rows, format_shares, run, selection_shares

    try:
        sizes = [int(x) for x in a.image_size.split(",") if x.strip()] if a.image_size else None
    except ValueError:
        raise ConfigError(f"--image-size must be comma-separated integers, got {a.image_size!r}") from None
    _, rows = run(models=a.model.split(",") if a.model else None, image_sizes=sizes, checkpoint=a.checkpoint,
                  model_type=a.model_type, batches=[int(x) for x in a.batch.split(",")], policies=a.policies.split(","),
                  budgets=[float(x) for x in a.budgets.split(",")], dtype=a.dtype, iters=a.iters,
                  sampling=SamplingConfig(cfg_scale=a.cfg_scale, top_k=a.top_k), json_path=a.json,
                  measure=not a.no_roofline, log=_log,
                  options=KernelConfig(attention=a.attention, gemm=a.gemm, segments=a.segments),
                  compile_workers=a.compile_workers)
    print(format_rows(rows))
    shares = selection_shares(rows)
    if shares:
        print(format_shares(shares))


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "convert":
            run_convert(a)
        elif a.cmd == "sample":
            run_sample(a)
        elif a.cmd == "compare":
            run_compare(a)
        elif a.cmd == "bench":
            run_bench(a)
        elif a.cmd == "merge":
            run_merge(a)
        elif a.cmd == "eval-demo":
            from .demo import run_eval_demo
            run_eval_demo(a, log=_log)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"adsa-jax {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
