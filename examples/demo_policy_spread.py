"""How much of a held-out NLL difference between two policies is noise? (demo model, teacher forcing)

    python examples/demo_policy_spread.py                       # the bundled model, budgets 0.25 and 0.5
    python examples/demo_policy_spread.py --gpt DIR --random-keys 4

`adsa-jax eval-demo` gives one number per policy: the mean NLL over the held-out images, with one
draw of the `random` policy (key 0). This script puts two spreads beside those numbers:

- per policy, the excess NLL over dense and the **standard error of the paired difference** with
  `adsa-evict` over the held-out images (the images are a sample; the same images go through
  every policy, so the per-image differences are what varies);
- for `random`, the spread (std) of its mean NLL **over several random draws** (`--random-keys`).

Needs scikit-learn (the data) or `--data FILE.npz`. fp32, XLA attention, cfg 1, as eval-demo.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

import adsa_jax
from adsa_jax import demo
from adsa_jax.generate import score
from adsa_jax.cache import make_policy


def per_image_nll(logits, tokens):
    lp = jax.nn.log_softmax(np.asarray(logits, np.float32), -1)
    return -np.asarray(np.take_along_axis(np.asarray(lp), np.asarray(tokens)[..., None], -1))[..., 0].mean(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", default=None, help="demo checkpoint directory (default: the bundled one)")
    p.add_argument("--data", default=None)
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--random-keys", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model = demo.load_demo_model(a.gpt)
    cfg = model.config
    data = demo.load_data(a.data)
    lab, tok = data["heldout_labels"], data["heldout_tokens"]

    def run(name, budget=None, key=0):
        t = time.perf_counter()
        lg = score(model, lab, tok, policy=make_policy(cfg, name, budget=budget),
                   key=jax.random.key(key), options=adsa_jax.KernelConfig(attention="xla"))
        out = per_image_nll(lg, tok)
        print(f"  {name} {budget} key {key}: {out.mean():.4f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        return out

    dense = run("dense")
    res = {"checkpoint": a.gpt or "bundled", "heldout_images": int(len(lab)), "dense_nll": float(dense.mean()),
           "budgets": {}}
    lines = ["| budget | policy | NLL - dense | paired s.e. of (policy - adsa-evict) | std over random draws |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for b in [float(x) for x in a.budgets.split(",") if x]:
        ev = run("adsa-evict", b)
        rows = {"adsa-evict": ev, "window": run("window", b)}
        rnd = [run("random", b, k) for k in range(a.random_keys)]
        rows["random"] = np.mean(rnd, axis=0)
        rb = res["budgets"][str(b)] = {}
        for name, v in rows.items():
            d = v - ev
            entry = {"excess_over_dense": float((v - dense).mean()), "minus_evict": float(d.mean()),
                     "paired_se": float(d.std(ddof=1) / np.sqrt(len(d)))}
            spread = ""
            if name == "random":
                means = [float(r.mean()) for r in rnd]
                entry.update(per_key_nll=means, std_over_keys=float(np.std(means, ddof=1)) if len(means) > 1 else None)
                spread = f"{entry['std_over_keys']:.4f} ({len(means)} draws; mean shown)" if len(means) > 1 else "-"
            rb[name] = entry
            se = "-" if name == "adsa-evict" else f"{entry['minus_evict']:+.4f} ± {entry['paired_se']:.4f}"
            lines.append(f"| {b:.2f} | {name} | {entry['excess_over_dense']:+.4f} | {se} | {spread or '-'} |")
    print(f"dense held-out NLL {dense.mean():.4f} over {len(lab)} images")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
