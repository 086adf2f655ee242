"""The whole lab on tiny synthetic data: CPU, no network, about a minute. For CI and for a first look.

Synthetic stand-ins for the three tarballs (same layout: package/emoji.json, package/img/<vendor>/64/*.png)
are written with their own integrity pins, then fetch (verify only), tokenize (16x16 grid), train (2 seeds,
a tiny GPT), evaluate (four policies at budget 0.5) and report run exactly as on the real data.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

import data as lab_data

VENDORS = ("twitter", "google")


def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def synthetic_emoji(rng, shape_id: int, colour) -> np.ndarray:
    """A 64x64 RGBA glyph: a coloured disc, square or bar on a transparent background."""
    yy, xx = np.mgrid[:64, :64]
    r = rng.integers(14, 26)
    cy, cx = rng.integers(24, 40, size=2)
    mask = [(yy - cy) ** 2 + (xx - cx) ** 2 < r * r, (abs(yy - cy) < r) & (abs(xx - cx) < r),
            abs(yy - cy) < r // 3][shape_id % 3]
    img = np.zeros((64, 64, 4), np.uint8)
    img[mask] = tuple(colour) + (255,)
    return img


def write_tarballs(d: Path, n_emoji: int = 48, seed: int = 0) -> dict:
    """Synthetic tarballs in d; returns their pins (a data.lock.json of their own)."""
    rng = np.random.default_rng(seed)
    subcats = ["disc", "square", "bar", "mixed"]
    emoji = [{"short_name": f"glyph{i}", "image": f"{i:04x}.png", "category": "Synthetic",
              "subcategory": subcats[i % 4], "has_img_twitter": True, "has_img_google": True,
              "skin_variations": None} for i in range(n_emoji)]
    d.mkdir(parents=True, exist_ok=True)
    pins = {"packages": [{"name": "emoji-datasource", "version": "16.0.0", "role": "labels"}] +
            [{"name": f"emoji-datasource-{v}", "version": "16.0.0", "role": "images", "vendor": v} for v in VENDORS]}
    with tarfile.open(d / lab_data.tarball_name(pins["packages"][0]), "w:gz") as tf:
        _add(tf, "package/emoji.json", json.dumps(emoji).encode())
    for k, v in enumerate(VENDORS):
        with tarfile.open(d / lab_data.tarball_name(pins["packages"][1 + k]), "w:gz") as tf:
            for i, e in enumerate(emoji):
                colour = rng.integers(0, 256, size=3)
                _add(tf, f"package/img/{v}/64/{e['image']}", _png(synthetic_emoji(rng, i, colour)))
    for p in pins["packages"]:
        p["integrity"] = lab_data._integrity(d / lab_data.tarball_name(p))
    return pins


def run(work: Path, log=print) -> dict:
    import evaluate
    import report
    import train

    work = Path(work)
    data_dir, run_dir = work / "data", work / "run"
    pins = write_tarballs(data_dir)
    lab_data.fetch(data_dir, pins)  # everything cached: verification only, no network
    if not (data_dir / "tokens.npz").is_file():
        lab_data.tokenize(data_dir, data_dir, codes=32, iters=3, fit_patches=20_000, split_file=work / "split.json",
                          pins=pins, pixels=32, log=log)
    # as `lab.py run`: the evaluation's programs compile in threads while training runs
    cfg = train.data_config(data_dir / "tokens.npz", dim=32, layers=2, heads=2)
    programs = evaluate.Programs(cfg, 2, evaluate.Inputs(data_dir, 8, 4))
    train.train(data_dir / "tokens.npz", run_dir, seeds=(0, 1), batch=4, total_steps=10, chunk=5, warmup=2,
                eval_every=5, eval_images=8, dim=32, layers=2, heads=2, log=log,
                on_compiled=lambda: programs.start("smoke", workers=2, log=log))
    evaluate.evaluate(data_dir, run_dir, images=8, samples=4, grid="smoke", classifier_steps=5, programs=programs,
                      log=log)
    return report.report(run_dir, work / "results", data_dir=data_dir, dataset="synthetic smoke stand-in", log=log)
