"""``adsa-jax convert gpt|vq``: LlamaGen PyTorch checkpoints -> adsa_jax directories."""
from __future__ import annotations

from .common import Stopwatch, log, parser


def add_parser(sub):
    p = parser(sub, "convert", "convert LlamaGen PyTorch checkpoints")
    what = p.add_subparsers(dest="what", required=True)
    g = parser(what, "gpt", "LlamaGen GPT .pt -> adsa_jax directory")
    g.add_argument("src", help="LlamaGen checkpoint (.pt / .pth), e.g. c2i_XL_384.pt")
    g.add_argument("--model", required=True, help="GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-1B, GPT-3B, GPT-7B, "
                   "or a JSON file of LlamaGen ModelArgs fields (required)")
    g.add_argument("--image-size", type=int, default=None,
                   help="resolution the checkpoint was trained at (256, 384, 512): it sets the 2D RoPE grid "
                        "(image_size // 16) and cannot be read from the weights (required with a named size; "
                        "default with a JSON file: its block_size)")
    g.add_argument("--type", dest="model_type", choices=("c2i", "t2i"), default=None,
                   help="class- or text-conditional (default: a JSON file's model_type, else c2i; one that "
                        "contradicts the JSON file is an error)")
    g.add_argument("--dtype", default=None, help="stored dtype: float32, float16 or bfloat16 (default: as in the file)")
    g.add_argument("--ema", action="store_true", help="use the 'ema' weights of a training checkpoint")
    g.add_argument("--out", required=True, help="output directory (required)")
    g.add_argument("--force", action="store_true", help="replace an output directory adsa_jax wrote (one that "
                   "holds other files, or the source, is never deleted)")
    v = parser(what, "vq", "LlamaGen VQ tokenizer .pt -> adsa_jax directory")
    v.add_argument("src", help="LlamaGen tokenizer checkpoint (.pt), e.g. vq_ds16_c2i.pt")
    v.add_argument("--preset", default="VQ-16", choices=("VQ-16", "VQ-8"),
                   help="LlamaGen's tokenizer preset, downsampling 16 or 8 (default: %(default)s)")
    v.add_argument("--ch", type=int, default=None, help="base channels (default: the preset's, 128)")
    v.add_argument("--ch-mult", default=None, help="comma-separated channel multipliers, e.g. 1,1,2,2,4 "
                   "(default: the preset's)")
    v.add_argument("--z-channels", type=int, default=None, help="latent channels (default: the preset's)")
    v.add_argument("--codebook-size", type=int, default=None, help="codebook entries (default: the preset's, 16384)")
    v.add_argument("--codebook-dim", type=int, default=None, help="codebook entry width (default: the preset's, 8)")
    v.add_argument("--dtype", default=None, help="stored dtype: float32, float16 or bfloat16 (default: as in the file)")
    v.add_argument("--ema", action="store_true", help="use the 'ema' weights of a training checkpoint")
    v.add_argument("--out", required=True, help="output directory (required)")
    v.add_argument("--force", action="store_true", help="replace an output directory adsa_jax wrote (one that "
                   "holds other files, or the source, is never deleted)")
    p.set_defaults(run=run)


def run(a):
    clock = Stopwatch()
    if a.what == "gpt":
        import jax

        from convert.gpt import convert_gpt, resolve_config

        cfg = resolve_config(a.model, image_size=a.image_size, model_type=a.model_type)
        log(f"converting {a.src} ({a.model} {cfg.model_type}, grid {cfg.grid}x{cfg.grid}) -> {a.out} ...")
        params = convert_gpt(a.src, cfg, a.out, image_size=a.image_size, dtype=a.dtype, prefer_ema=a.ema,
                             overwrite=a.force)
        n = sum(x.size for x in jax.tree.leaves(params))
        log(f"wrote {a.out}: {a.model} {cfg.model_type}, grid {cfg.grid}x{cfg.grid}, {n:,} values, "
            f"dtype {jax.tree.leaves(params)[0].dtype} ({clock():.1f} s)")
    else:
        from convert.vq import convert_vq, vq_arg_config

        from .common import split_list

        ch_mult = tuple(split_list(a.ch_mult, "--ch-mult", int)) if a.ch_mult else None
        cfg = vq_arg_config(ch=a.ch, ch_mult=ch_mult, z_channels=a.z_channels, codebook_size=a.codebook_size,
                            codebook_embed_dim=a.codebook_dim, preset=a.preset)
        log(f"converting {a.src} (VQ tokenizer) -> {a.out} ...")
        convert_vq(a.src, a.out, cfg=cfg, dtype=a.dtype, prefer_ema=a.ema, overwrite=a.force)
        log(f"wrote {a.out}: VQ tokenizer, codebook {cfg.codebook_size}x{cfg.codebook_embed_dim} ({clock():.1f} s)")
