"""The lab's report: results/summary.json, the README table with a verdict per budget, and plots.

Verdict rule: at each budget the policy with the lowest excess NLL wins; the win is "beyond noise"
when its paired difference to the runner-up (per image, the same images and seeds) exceeds two
standard errors AND it is ahead on every seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import data as lab_data

SCHEMA_ROW = ("policy", "granularity", "budget", "excess_nll", "excess_nll_se", "seed_spread", "kl", "top1",
              "class_acc", "feature_fd", "mirror_acc", "kv_bytes_per_image")


def _fname(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in key)


def summary(ev: dict, train_meta: dict, dataset: str) -> dict:
    rows = []
    for key, r in ev["rows"].items():
        row = {k: r.get(k) for k in SCHEMA_ROW}
        row.update({k: r[k] for k in ("base_policy", "period", "mirror_top1", "excess_nll_per_seed", "sizes") if k in r})
        row["key"] = key
        rows.append(row)
    rows.sort(key=lambda r: (r["budget"] or 1.0, r["policy"], r["granularity"] or ""))
    return {"dataset": dataset, "grid": [int(round(train_meta["config"]["block_size"] ** 0.5))] * 2,
            "model": {"layers": ev["model"]["layers"], "width": ev["model"]["width"], "params": ev["model"]["params"]},
            "seeds": ev["seeds"], "images": ev.get("images"), "samples": ev.get("samples"),
            "sampling": ev.get("sampling"), "classifier_heldout_accuracy": ev.get("classifier_heldout_accuracy"),
            "training": {k: train_meta.get(k) for k in ("step", "total_steps", "batch", "peak_lr", "device", "jax")},
            "rows": rows}


def convergence(train_log: dict | None) -> dict:
    """Whether held-out NLL has flattened: its relative fall over the last quarter of the evaluated
    steps is under 1 % for every seed. Policy comparisons on a model that has not are not evidence."""
    ev = (train_log or {}).get("eval") or []
    if len(ev) < 3:
        return {"flattened": False, "reason": f"{len(ev)} held-out evaluations (need 3 or more)"}
    last = ev[-1]
    cut = next(e for e in ev if e["step"] >= 0.75 * last["step"])
    if cut is last:
        cut = ev[-2]
    fall = [(a - b) / a for a, b in zip(cut["heldout_nll"], last["heldout_nll"])]
    return {"flattened": bool(max(fall) < 0.01), "relative_fall": fall, "from_step": cut["step"],
            "to_step": last["step"], "heldout_nll": last["heldout_nll"]}


def verdicts(summ: dict, run: Path | None) -> dict:
    """{budget: (winner key, runner-up key, diff, se, beyond_noise, all_seeds)}."""
    out = {}
    budgets = sorted({r["budget"] for r in summ["rows"] if r["budget"] is not None})
    for b in budgets:
        cand = sorted((r for r in summ["rows"] if r["budget"] == b), key=lambda r: r["excess_nll"])
        if len(cand) < 2:
            continue
        w, u = cand[0], cand[1]
        diff, se, seeds_ok = u["excess_nll"] - w["excess_nll"], None, None
        fw = run / f"excess_{_fname(w['key'])}.npy" if run else None
        fu = run / f"excess_{_fname(u['key'])}.npy" if run else None
        if fw is not None and fw.is_file() and fu.is_file():
            d = np.load(fu).astype(np.float64) - np.load(fw).astype(np.float64)  # (S, images) paired
            se = float(np.sqrt(np.mean(d.var(1, ddof=1) / d.shape[1]) / d.shape[0]))
            seeds_ok = bool(np.all(d.mean(1) > 0))
        else:
            se = float(np.hypot(w["excess_nll_se"], u["excess_nll_se"]))  # no pairing: conservative
            ps_w, ps_u = w.get("excess_nll_per_seed"), u.get("excess_nll_per_seed")
            seeds_ok = bool(ps_w and ps_u and all(a < b_ for a, b_ in zip(ps_w, ps_u)))
        out[b] = {"winner": w["key"], "runner_up": u["key"], "diff": diff, "se": se,
                  "beyond_noise": bool(diff > 2 * se and seeds_ok), "all_seeds": seeds_ok}
    return out


def _name(r) -> str:
    g = f" ({r['granularity']})" if r.get("granularity") else ""
    return f"{r['policy']}{g}"


def table(summ: dict, verd: dict) -> str:
    lines = ["| budget | policy | excess NLL (nats/token) | KL | top-1 | class acc | feature FD | mirror acc | KV / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summ["rows"]:
        b = "1.0" if r["budget"] is None else f"{r['budget']:.2f}"
        lines.append(f"| {b} | {_name(r)} | {r['excess_nll']:+.4f} ± {r['excess_nll_se']:.4f} (spread {r['seed_spread']:.4f}) "
                     f"| {r['kl']:.4f} | {r['top1']:.3f} | {r['class_acc']:.3f} | {r['feature_fd']:.2f} | "
                     f"{r['mirror_acc']:.3f} | {r['kv_bytes_per_image'] / 2**20:.2f} MiB |")
    lines.append("")
    names = {r["key"]: _name(r) for r in summ["rows"]}
    for b, v in verd.items():
        word = "beyond noise" if v["beyond_noise"] else "within noise"
        lines.append(f"- Budget {b}: **{names[v['winner']]}** has the lowest excess NLL, {v['diff']:.4f} nats/token below "
                     f"{names[v['runner_up']]} (paired SE {v['se']:.4f}; ahead on "
                     f"{'every' if v['all_seeds'] else 'not every'} seed): {word}.")
    return "\n".join(lines)


def plots(summ: dict, out: Path, run: Path | None, codebook=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    by = {}
    for r in summ["rows"]:
        if r["budget"] is not None:
            by.setdefault(_name(r), []).append(r)
    for name, rs in sorted(by.items()):
        rs.sort(key=lambda r: r["budget"])
        ax.errorbar([r["budget"] for r in rs], [r["excess_nll"] for r in rs], yerr=[2 * r["excess_nll_se"] for r in rs],
                    marker="o", capsize=3, label=name)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("budget (fraction of the 576 image tokens kept)")
    ax.set_ylabel("excess held-out NLL vs dense (nats/token, ±2 SE)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "excess_nll.png", dpi=110)
    plt.close(fig)
    if run is not None and (run / "train_log.json").is_file():
        log = json.loads((run / "train_log.json").read_text())
        fig, ax = plt.subplots(figsize=(7, 4))
        tr = log["train"]
        for s in range(len(tr[0]["loss"])):
            ax.plot([t["step"] for t in tr], [t["loss"][s] for t in tr], lw=0.7, label=f"train, seed {s}")
        for s in range(len(log["eval"][0]["heldout_nll"])):
            ax.plot([e["step"] for e in log["eval"]], [e["heldout_nll"][s] for e in log["eval"]], marker="o",
                    label=f"held-out, seed {s}")
        ax.set_xlabel("step")
        ax.set_ylabel("NLL (nats/token)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
    if run is not None and codebook is not None:
        from PIL import Image
        strips, names = [], []
        for r in summ["rows"]:
            f = run / f"samples_{_fname(r['key'])}.npy"
            if f.is_file() and (r["budget"] is None or abs(r["budget"] - 0.44) < 0.01):
                t = np.load(f).astype(np.int64)[:8]
                strips.append(np.concatenate(list(lab_data.decode_tokens(t, codebook)), axis=1))
                names.append(_name(r))
        if strips:
            w = max(s.shape[1] for s in strips)
            grid = np.concatenate([np.pad(s, ((2, 2), (0, w - s.shape[1]), (0, 0)), constant_values=255) for s in strips])
            Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "samples_b044.png")
            (out / "samples_b044.txt").write_text("rows, top to bottom (seed 0, classes 0-7, same keys):\n"
                                                  + "\n".join(names) + "\n")


def report(run: Path, out: Path, *, data_dir: Path | None = None, dataset: str = "emoji-datasource 16.0.0 "
           "(twitter + google), 24x24 k-means tokens", log=print) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    summ = summary(ev, meta, dataset)
    tlog = json.loads((run / "train_log.json").read_text()) if (run / "train_log.json").is_file() else None
    summ["model"]["convergence"] = convergence(tlog)
    if not summ["model"]["convergence"]["flattened"]:
        log("report: held-out NLL has NOT flattened: these rows check the pipeline; they are not evidence")
    verd = verdicts(summ, run)
    summ["verdicts"] = {str(b): v for b, v in verd.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summ, indent=1))
    (out / "table.md").write_text(table(summ, verd) + "\n")
    codebook = None
    for d in (data_dir, run.parent):
        if d is not None and (d / "tokenizer.npz").is_file():
            codebook = lab_data.load_tokenizer(d / "tokenizer.npz")
    try:
        plots(summ, out, run, codebook)
    except ImportError:
        log("report: matplotlib is not installed: no plots (pip install matplotlib)")
    log(f"report: {len(summ['rows'])} rows -> {out / 'summary.json'}, {out / 'table.md'}")
    return summ
