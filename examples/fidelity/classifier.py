"""The lab's judge: a small convolutional classifier of subcategories, trained on real images only.

Its penultimate features define the Fréchet distance between generated and held-out real images
(a "feature FD" in this classifier's space, never called FID: the network is ours and small).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

WIDTHS = (32, 64, 128)
FEATURES = 128


def init(key, classes: int):
    ks = jax.random.split(key, len(WIDTHS) + 2)
    p, cin = {}, 3
    for i, w in enumerate(WIDTHS):
        p[f"conv{i}"] = jax.random.normal(ks[i], (3, 3, cin, w)) * (2.0 / (9 * cin)) ** 0.5
        p[f"bias{i}"] = jnp.zeros((w,))
        cin = w
    p["fc"] = jax.random.normal(ks[-2], (cin, FEATURES)) * (2.0 / cin) ** 0.5
    p["fc_b"] = jnp.zeros((FEATURES,))
    p["out"] = jax.random.normal(ks[-1], (FEATURES, classes)) * (1.0 / FEATURES) ** 0.5
    p["out_b"] = jnp.zeros((classes,))
    return p


def features(p, images_uint8):
    """(B, H, W, 3) uint8 -> (B, FEATURES) float32."""
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    for i in range(len(WIDTHS)):
        x = jax.lax.conv_general_dilated(x, p[f"conv{i}"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + p[f"bias{i}"])
    x = x.mean(axis=(1, 2))  # (B, C) global average
    return jax.nn.relu(x @ p["fc"] + p["fc_b"])


def logits(p, images_uint8):
    return features(p, images_uint8) @ p["out"] + p["out_b"]


def train(images, labels, val_images, val_labels, classes: int, *, steps: int = 3000, batch: int = 128,
          seed: int = 0, log=print):
    """Adam with random shifts; returns (params, held-out accuracy)."""
    tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
    p = init(jax.random.key(seed), classes)
    st = tx.init(p)
    imgs, labs = jnp.asarray(images), jnp.asarray(labels)

    @jax.jit
    def step(p, st, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch,), 0, imgs.shape[0])
        x = imgs[idx]
        sh = jax.random.randint(k2, (2,), -3, 4)
        x = jnp.roll(x, (sh[0], sh[1]), axis=(1, 2))  # one random shift per batch: cheap augmentation

        def loss(p):
            lp = jax.nn.log_softmax(logits(p, x))
            return -jnp.take_along_axis(lp, labs[idx][:, None], 1).mean()

        lv, g = jax.value_and_grad(loss)(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st, lv

    key = jax.random.key(seed + 1)
    for i in range(steps):
        p, st, lv = step(p, st, jax.random.fold_in(key, i))
        if (i + 1) % 500 == 0 and log:
            log(f"classifier: step {i + 1}/{steps} loss {float(lv):.3f}")
    acc = accuracy(p, val_images, val_labels)
    return p, acc


def predict(p, images, chunk: int = 512):
    f = jax.jit(lambda x: (jnp.argmax(logits(p, x), -1), features(p, x)))
    preds, feats = [], []
    for a in range(0, len(images), chunk):
        pr, fe = f(jnp.asarray(images[a:a + chunk]))
        preds.append(np.asarray(pr))
        feats.append(np.asarray(fe, np.float64))
    return np.concatenate(preds), np.concatenate(feats)


def accuracy(p, images, labels) -> float:
    pr, _ = predict(p, images)
    return float(np.mean(pr == np.asarray(labels)))


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F)."""
    from scipy import linalg

    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2)
    covmean = np.real(covmean[0] if isinstance(covmean, tuple) else covmean)  # scipy < 1.12 returns a pair
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * covmean))


def save(path: Path, p, acc: float):
    np.savez(path, **{k: np.asarray(v) for k, v in p.items()})
    path.with_suffix(".json").write_text(json.dumps({"heldout_accuracy": acc}))


def load(path: Path):
    with np.load(path) as z:
        p = {k: jnp.asarray(z[k]) for k in z.files}
    return p, json.loads(path.with_suffix(".json").read_text())["heldout_accuracy"]
