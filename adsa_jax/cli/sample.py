"""``adsa-jax sample``: images (tokens, a PNG grid, PNGs, or a resumable .npz for FID) from a
converted GPT, or from the bundled demo model when no ``--gpt`` is given."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .common import (DEMO_CLASSES, LLAMAGEN_SAMPLING, Stopwatch, add_dtype_arg, add_kernel_args, add_policy_args,
                     add_sampling_args, balanced_labels, default_classes, kernels_from_args, log,
                     parse_classes, parser, policy_from_args, sampling_from_args, save_npy)


def add_parser(sub):
    from ..demo import DEMO_SAMPLING

    s = parser(sub, "sample", "sample images (tokens, PNG grid, PNGs, .npz)")
    s.add_argument("--gpt", default=None, help="GPT directory from `adsa-jax convert gpt` (default: the bundled "
                   "demo model, sklearn digits 16x16, with its own quantiser; --out then defaults to samples.png)")
    s.add_argument("--side-by-side", action="store_true", help="demo model: dense (left) and --policy (right) "
                   "images of the same seeds in one grid")
    s.add_argument("--vq", default=None, help="VQ directory from `adsa-jax convert vq`, to decode images "
                   "(default: none, tokens only)")
    s.add_argument("--classes", default=None, help="comma-separated class ids (default: LlamaGen's "
                   f"{DEMO_CLASSES} for ImageNet models, the first 8 classes of smaller label sets, "
                   "4 per digit for the demo model; class-balanced, i %% num_classes, with --num-samples)")
    s.add_argument("--caption-embs", default=None, help="t2i: .npz with caption_embs (B,120,C) and emb_masks (B,120) "
                   "(default: none)")
    s.add_argument("--prompt", action="append", default=None, help="t2i: a text prompt (repeatable); needs --t5 (default: none)")
    s.add_argument("--prompts-file", default=None, help="t2i: UTF-8 text file, one prompt per line "
                   "(blank lines skipped) (default: none)")
    s.add_argument("--t5", default=None, help="t2i: local Hugging Face T5 model directory (flan-t5-xl) that encodes "
                   "--prompt / --prompts-file; needs the extra: pip install 'adsa-jax[t5]' (default: none)")
    s.add_argument("--no-left-padding", action="store_true", help="t2i prompts: keep T5's right padding "
                   "(LlamaGen's --no-left-padding; the released models expect left padding)")
    s.add_argument("--num-samples", type=int, default=None, help="number of images (default: one per class id, or "
                   "per caption)")
    s.add_argument("--batch-size", type=int, default=None, help="images per generate call (default: all at once; "
                   "64 with --npz)")
    s.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i) (default: %(default)s)")
    add_kernel_args(s)
    # Unset (None) sampling values: LlamaGen's sample_c2i.py with --gpt, the demo model's own without.
    add_sampling_args(s, cfg_scale=f"4.0; the demo model {DEMO_SAMPLING['cfg_scale']}",
                      temperature=f"1.0; the demo model {DEMO_SAMPLING['temperature']}",
                      top_k=f"2000; the demo model {DEMO_SAMPLING['top_k']}", defaults=False)
    add_dtype_arg(s)
    add_policy_args(s)
    s.add_argument("--tokens-out", default=None, help="write the (N, h*w) int32 tokens as .npy (default: none)")
    s.add_argument("--out", default=None, help="PNG grid of the images (default: none; samples.png for the demo "
                   "model)")
    s.add_argument("--out-dir", default=None, help="one PNG per image in this directory (default: none)")
    s.add_argument("--npz", default=None, help="arr_0: uint8 images (N,H,W,3) for the ImageNet FID evaluator (tokens "
                   "without --vq), arr_1: labels. Resumable: finished batches go to NPZ.parts/ (rerun to resume) "
                   "(default: none)")
    s.add_argument("--max-batches", type=int, default=None, help="with --npz: stop after this many new batches "
                   "(default: all)")
    s.add_argument("--data-parallel", type=int, default=None, help="data axis of the mesh; batches are split over "
                   "it (default: all devices / --tensor-parallel)")
    s.add_argument("--tensor-parallel", type=int, default=1, help="model axis of the mesh: shard heads and FFN "
                   "hidden over this many devices, for models too large for one (default: %(default)s)")
    s.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() "
                   "first (auto-detected on TPU pods / SLURM; elsewhere give the three options below)")
    s.add_argument("--coordinator-address", default=None, help="with --distributed: HOST:PORT of process 0 "
                   "(default: auto-detected)")
    s.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of hosts (default: "
                   "auto-detected)")
    s.add_argument("--process-id", type=int, default=None, help="with --distributed: this host's index (default: "
                   "auto-detected)")
    s.set_defaults(run=run)


def run(a):
    from ..checks import check_sample_args

    # every number and output path, before a checkpoint is read
    check_sample_args(num_samples=a.num_samples, batch_size=a.batch_size, max_batches=a.max_batches,
                      num_segments=a.segments, data_parallel=a.data_parallel, tensor_parallel=a.tensor_parallel,
                      seed=a.seed, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg_scale,
                      cfg_interval=a.cfg_interval, budget=a.budget, prefix=a.prefix, keep=a.keep, local=a.local,
                      out=a.out, tokens_out=a.tokens_out, out_dir=a.out_dir, npz=a.npz)
    if a.gpt is None:  # the bundled demo model (sklearn digits) and its gray-level quantiser
        return run_demo(a)
    if a.side_by_side:
        raise ConfigError("--side-by-side is for the bundled demo model (no --gpt)")
    import jax

    from ..checkpoint import load
    from ..generate import generate
    from ..runs import initialize_distributed, mesh_from_args
    from ..sharding import to_host

    sampling = sampling_from_args(a, LLAMAGEN_SAMPLING)
    options = kernels_from_args(a)
    if a.distributed:  # before anything touches a device
        initialize_distributed(a.coordinator_address, a.num_processes, a.process_id)
    mesh = mesh_from_args(a.data_parallel, a.tensor_parallel)  # None on one device: the plain path
    clock = Stopwatch()
    log(f"loading {a.gpt} ...")
    model = load(a.gpt, dtype=a.dtype, mesh=mesh)  # restored straight into the mesh's shardings
    cfg = model.config
    log(f"loaded in {clock():.1f} s")
    vq = None
    if a.vq:
        from ..vq import load_vq
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
    n = cond_all.shape[0]
    policy = policy_from_args(cfg, a)
    bs = a.batch_size or n
    key = jax.random.key(a.seed)
    kw = dict(sampling=sampling, policy=policy, options=options)
    if mesh is not None:
        log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices ({jax.process_count()} processes)")
    if a.npz:  # large runs: resumable batches in NPZ.parts/, merged into NPZ (adsa_jax.runs)
        return sample_npz(a, model, cond_all, mask_all, labels, key, kw, vq, mesh)
    tokens, images = [], []
    nb = -(-n // bs)
    log(f"model {cfg.n_layer} layers x {cfg.dim}, grid {cfg.grid}x{cfg.grid}, {model.dtype}, policy {policy.name}; "
        f"{n} images in {nb} batch(es) of {bs}")
    t_start = time.perf_counter()
    writer = jax.process_index() == 0  # several hosts: each holds all tokens, process 0 writes the files
    for i, s in enumerate(range(0, n, bs)):
        cond = cond_all[s:s + bs]
        cmask = None if mask_all is None else mask_all[s:s + bs]
        t0 = time.perf_counter()
        if i == 0:
            log("compiling and sampling the first batch (the first call compiles; later batches of this size "
                "reuse the program) ...")
        tok = to_host(generate(model, cond, key, cond_mask=cmask, example_ids=np.arange(s, s + len(cond)),
                               mesh=mesh, **kw))  # other hosts' rows gathered
        dt = time.perf_counter() - t0
        tokens.append(tok)
        msg = f"batch {i + 1}/{nb}: {len(cond)} images sampled in {dt:.2f} s" + (" (with compilation)" if i == 0 else "")
        if vq is not None and writer:
            from ..vq import decode_codes
            t1 = time.perf_counter()
            images.append(np.asarray(decode_codes(vq, tok)))
            msg += f", decoded in {time.perf_counter() - t1:.2f} s"
        log(msg + f"; {s + len(cond)}/{n} images, {time.perf_counter() - t_start:.1f} s elapsed")
    tokens = np.concatenate(tokens)
    total = time.perf_counter() - t_start
    log(f"done: {n} images in {total:.1f} s ({n / total:.2f} images/s including compilation)")
    if a.tokens_out and writer:
        save_npy(a.tokens_out, tokens)
        log(f"tokens -> {a.tokens_out} {tokens.shape} int32")
    if images:
        from ..images import to_uint8
        write_images(a, to_uint8(np.concatenate(images)))
    return tokens


def run_demo(a):
    """No --gpt: the bundled digits model, its quantiser, a PNG grid (4 images per digit by default)."""
    import jax

    from ..demo import DEMO_SAMPLING, NUM_CLASSES, load_demo_model, sample_demo
    from ..options import SamplingConfig

    bad = [f for f, v in (("--vq", a.vq), ("--npz", a.npz), ("--prompt", a.prompt), ("--prompts-file", a.prompts_file),
                          ("--caption-embs", a.caption_embs), ("--t5", a.t5), ("--distributed", a.distributed))
           if v]
    if a.tensor_parallel not in (None, 1) or a.data_parallel not in (None, 1):
        bad.append("--tensor-parallel/--data-parallel")
    if bad:
        raise ConfigError(f"{', '.join(bad)} need(s) --gpt: without it `sample` uses the bundled demo digits model "
                          "(10 classes, its own 16-level gray quantiser)")
    sampling = sampling_from_args(a, SamplingConfig(**DEMO_SAMPLING))
    options = kernels_from_args(a)
    out = a.out or ("samples.png" if not a.out_dir else None)
    model = load_demo_model(dtype=a.dtype)
    cfg = model.config
    if a.classes is not None:
        labels = parse_classes(a.classes, cfg.num_classes)
        if a.num_samples is not None:
            labels = np.resize(labels, a.num_samples)
    else:
        labels = balanced_labels(a.num_samples or 4 * NUM_CLASSES, cfg.num_classes)
    policy = policy_from_args(cfg, a)
    return sample_demo(model, labels, jax.random.key(a.seed), sampling=sampling, policy=policy, options=options,
                       side_by_side=a.side_by_side, out=out, out_dir=a.out_dir, tokens_out=a.tokens_out, log=log)


# ----------------------------------------------------------------------------- outputs


def write_images(a, u8):
    """--out (grid) and --out-dir (one PNG per image) from uint8 images (N, H, W, 3)."""
    from ..images import save_png_grid, save_pngs

    if a.out:
        save_png_grid(u8, a.out)
        log(f"grid -> {a.out}")
    if a.out_dir:
        save_pngs(u8, a.out_dir, [f"{i:06d}.png" for i in range(len(u8))])
        log(f"{len(u8)} PNGs -> {a.out_dir}")


def sample_npz(a, model, cond_all, mask_all, labels, key, kw, vq, mesh):
    """--npz: batches written to NPZ.parts/ as they finish (resumable), then merged (adsa_jax.runs)."""
    from ..runs import read_parts, sample_to_npz

    n = cond_all.shape[0]
    bs = a.batch_size or min(n, 64)
    settings = {"seed": a.seed, "gpt": model.config.to_dict(), "dtype": str(model.dtype), "policy": repr(kw["policy"]),
                "sampling": dataclasses.asdict(kw["sampling"]),
                "vq": None if vq is None else vq.config.to_dict()}
    path = sample_to_npz(model, cond_all, key, a.npz, batch_size=bs, cond_mask=mask_all, labels=labels, vq=vq,
                         mesh=mesh, max_batches=a.max_batches, settings=settings, log=log, **kw)
    if path is None:
        return None
    if a.tokens_out:
        tokens = read_parts(a.npz, "tokens")
        save_npy(a.tokens_out, tokens)
        log(f"tokens -> {a.tokens_out} {tokens.shape} int32")
    if vq is not None and (a.out or a.out_dir):
        with np.load(path) as z:
            write_images(a, z["arr_0"])
    return path


# ----------------------------------------------------------------------------- text conditions


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

    from ..text import T5NotInstalledError, encode_prompts, release_t5, t5_width

    if not a.t5:
        raise ConfigError("text prompts need the T5 encoder: pass --t5 PATH (a local Hugging Face flan-t5-xl "
                          "directory), or precomputed features with --caption-embs FILE.npz")
    d = t5_width(a.t5)
    if d != width:
        raise ConfigError(f"the T5 encoder in {a.t5} produces width {d} (d_model) but this model's caption_dim is "
                          f"{width}; LlamaGen's t2i models use flan-t5-xl (2048)")
    log(f"encoding {len(prompts)} prompt(s) with the T5 encoder in {a.t5} ...")
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
        log(f"warning: {w.message}")
    log(f"prompts encoded in {time.perf_counter() - t0:.2f} s")
    return emb, masks
