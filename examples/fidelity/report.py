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
            "training": {**{k: train_meta.get(k) for k in ("step", "total_steps", "best_step", "batch", "peak_lr", "device",
                                                          "jax")},
                         "evaluated_step": ev.get("evaluated_step", train_meta.get("step"))},
            "rows": rows}


def convergence(train_log: dict | None, longer: dict | None = None) -> dict:
    """Whether held-out NLL has flattened: its relative fall over the last quarter of the evaluated
    steps is under 1 % for every seed. Policy comparisons on a model that has not are not evidence.

    A cosine schedule keeps the loss falling until its last step, so a run on the schedule that ends
    at the held-out optimum never looks flat by that test. `longer` (the convergence block of a longer
    schedule's summary, the same seeds) settles it: when that run overfit, and its lowest held-out NLL
    is no lower (by 1 %) than this run's last on any seed, more training cannot help this model."""
    ev = (train_log or {}).get("eval") or []
    if len(ev) < 3:
        return {"flattened": False, "reason": f"{len(ev)} held-out evaluations (need 3 or more)"}
    last = ev[-1]
    cut = next(e for e in ev if e["step"] >= 0.75 * last["step"])
    if cut is last:
        cut = ev[-2]
    fall = [(a - b) / a for a, b in zip(cut["heldout_nll"], last["heldout_nll"])]
    # past its held-out optimum (overfitting) is flat too, but the comparisons are then made on a model
    # that memorises its training set: say so, with where the optimum was
    best = min(ev, key=lambda e: float(np.mean(e["heldout_nll"])))
    rise = [(b - a) / a for a, b in zip(best["heldout_nll"], last["heldout_nll"])]
    conv = {"flattened": bool(max(fall) < 0.01), "criterion": "last-quarter fall under 1 %", "relative_fall": fall,
            "from_step": cut["step"], "to_step": last["step"], "heldout_nll": last["heldout_nll"],
            "best_step": best["step"], "best_heldout_nll": best["heldout_nll"], "overfit": bool(min(rise) > 0.01),
            "rise_since_best": rise}
    if longer is not None and not conv["flattened"]:
        lb = longer.get("best_heldout_nll") or []
        if len(lb) != len(last["heldout_nll"]):
            raise lab_data.DataError(f"report: --longer-run has {len(lb)} seeds' held-out NLL, this run "
                              f"{len(last['heldout_nll'])}: give the summary.json of a longer run of the same seeds")
        gain = [(x - y) / x for x, y in zip(last["heldout_nll"], lb)]  # > 0: the longer run got lower
        conv.update(flattened=bool(longer.get("overfit")) and max(gain) < 0.01,
                    criterion="a longer schedule overfit and never got 1 % lower", longer_best_step=longer.get("best_step"),
                    longer_best_heldout_nll=lb, longer_gain=gain)
    return conv


def paired(run: Path | None, a: dict, b: dict) -> tuple[float, float, bool]:
    """(mean of b's excess minus a's, its paired standard error, a ahead on every seed): a positive
    difference means a is better. Pairs per image and seed when both rows' per-image files exist."""
    diff = b["excess_nll"] - a["excess_nll"]
    fa = run / f"excess_{_fname(a['key'])}.npy" if run else None
    fb = run / f"excess_{_fname(b['key'])}.npy" if run else None
    if fa is not None and fa.is_file() and fb.is_file():
        d = np.load(fb).astype(np.float64) - np.load(fa).astype(np.float64)  # (S, images) paired
        return diff, float(np.sqrt(np.mean(d.var(1, ddof=1) / d.shape[1]) / d.shape[0])), bool(np.all(d.mean(1) > 0))
    ps_a, ps_b = a.get("excess_nll_per_seed"), b.get("excess_nll_per_seed")
    return (diff, float(np.hypot(a["excess_nll_se"], b["excess_nll_se"])),  # no pairing: conservative
            bool(ps_a and ps_b and all(x < y for x, y in zip(ps_a, ps_b))))


# the question the lab exists for: the paper's policy against the baselines it must beat
HEAD_TO_HEAD = ("adsa-evict|head", ("random-uniform|None", "random|None", "window|None", "h2o|None", "adsa-evict|layer"))


def head_to_head(summ: dict, run: Path | None) -> dict:
    """{budget: [{"against", "diff", "se", "all_seeds", "beyond_noise", "mirror_acc": (ours, theirs)}]}; diff > 0:
    adsa-evict (head) has the lower excess NLL."""
    by = {(r["key"].rsplit("|", 2)[0], r["budget"]): r for r in summ["rows"] if r["key"].endswith("|")}
    out = {}
    for b in sorted({r["budget"] for r in summ["rows"] if r["budget"] is not None}):
        ours = by.get((HEAD_TO_HEAD[0], b))
        if ours is None:
            continue
        out[b] = []
        for other in HEAD_TO_HEAD[1]:
            r = by.get((other, b))
            if r is None:
                continue
            diff, se, ahead = paired(run, ours, r)
            behind = paired(run, r, ours)[2]
            out[b].append({"against": r["key"], "diff": diff, "se": se, "adsa_ahead_every_seed": ahead,
                           "adsa_behind_every_seed": behind,
                           "beyond_noise": bool(abs(diff) > 2 * se and (ahead if diff > 0 else behind)),
                           "mirror_acc": [ours["mirror_acc"], r["mirror_acc"]]})
    return out


def verdicts(summ: dict, run: Path | None) -> dict:
    """{budget: (winner key, runner-up key, diff, se, beyond_noise, all_seeds)}."""
    out = {}
    budgets = sorted({r["budget"] for r in summ["rows"] if r["budget"] is not None})
    for b in budgets:
        cand = sorted((r for r in summ["rows"] if r["budget"] == b), key=lambda r: r["excess_nll"])
        if len(cand) < 2:
            continue
        w, u = cand[0], cand[1]
        diff, se, seeds_ok = paired(run, w, u)
        out[b] = {"winner": w["key"], "runner_up": u["key"], "diff": diff, "se": se,
                  "beyond_noise": bool(diff > 2 * se and seeds_ok), "all_seeds": seeds_ok}
    return out


def _name(r) -> str:
    g = f" ({r['granularity']})" if r.get("granularity") else ""
    return f"{r['policy']}{g}"


def compact_table(summ: dict) -> str:
    """Policies down, budgets across: excess NLL ± paired SE, and mirror accuracy (dense's in the title)."""
    budgets = sorted({r["budget"] for r in summ["rows"] if r["budget"] is not None})
    dense = next((r for r in summ["rows"] if r["budget"] is None), None)
    names = sorted({_name(r) for r in summ["rows"] if r["budget"] is not None})
    cell = {(_name(r), r["budget"]): r for r in summ["rows"]}
    head = "| policy | " + " | ".join(f"{b:.2f}" for b in budgets) + " |"
    lines = [f"Excess held-out NLL vs dense (nats/token, ± paired SE) / mirror accuracy (dense: "
             f"{dense['mirror_acc']:.3f}), per budget:" if dense else "", "", head,
             "| --- |" + " --- |" * len(budgets)]
    for n in names:
        cs = [cell.get((n, b)) for b in budgets]
        lines.append(f"| {n} | " + " | ".join(f"{c['excess_nll']:+.4f} ± {c['excess_nll_se']:.4f} / {c['mirror_acc']:.2f}"
                                              if c else "not run" for c in cs) + " |")
    return "\n".join(lines)


def table(summ: dict, verd: dict, h2h: dict | None = None) -> str:
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
        lines.append(f"- Budget {b:.2f}: **{names[v['winner']]}** has the lowest excess NLL, {v['diff']:.4f} nats/token below "
                     f"{names[v['runner_up']]} (paired SE {v['se']:.4f}; ahead on "
                     f"{'every' if v['all_seeds'] else 'not every'} seed): {word}.")
    for b, comps in (h2h or {}).items():
        parts = []
        for c in comps:
            if c["beyond_noise"]:
                word = ("better than " if c["diff"] > 0 else "worse than ") + names[c["against"]]
            else:
                word = f"not separable from {names[c['against']]}"
            parts.append(f"{word} ({c['diff']:+.4f} ± {c['se']:.4f}; mirror acc "
                         f"{c['mirror_acc'][0]:.3f} vs {c['mirror_acc'][1]:.3f})")
        lines.append(f"- Budget {b:.2f}, adsa-evict (head) is " + "; ".join(parts) + ".")
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
    colors = plt.get_cmap("tab20").colors  # more series than tab10 has colours
    for i, (name, rs) in enumerate(sorted(by.items())):
        rs.sort(key=lambda r: r["budget"])
        ax.errorbar([r["budget"] for r in rs], [r["excess_nll"] for r in rs], yerr=[2 * r["excess_nll_se"] for r in rs],
                    marker="os^vD"[i % 5], capsize=3, label=name, color=colors[i % len(colors)])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(bottom=-1e-3)
    ax.set_xlabel("budget (fraction of the 576 image tokens kept)")
    ax.set_ylabel("excess held-out NLL vs dense (nats/token, ±2 SE)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "excess_nll.png", dpi=110)
    plt.close(fig)
    if run is not None and (run / "train_log.json").is_file():
        log = lab_data.read_json(run / "train_log.json", ("train", "eval"))
        fig, ax = plt.subplots(figsize=(7, 4))
        tr = log["train"]
        for s in range(len(tr[0]["loss"])):
            ax.plot([t["step"] for t in tr], [t["loss"][s] for t in tr], lw=0.7, label=f"train, seed {s}")
        for s in range(len(log["eval"][0]["heldout_nll"])):
            ax.plot([e["step"] for e in log["eval"]], [e["heldout_nll"][s] for e in log["eval"]], marker="o",
                    label=f"held-out, seed {s}")
        tr_meta = summ.get("training", {})
        for step, style, what in ((tr_meta.get("best_step"), ":", "held-out optimum"),
                                  (tr_meta.get("evaluated_step"), "--", "policies compared here")):
            if step:
                ax.axvline(step, color="k", ls=style, lw=0.8, label=f"{what} (step {step})")
        ax.set_xlabel("step")
        ax.set_ylabel("NLL (nats/token)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
    for budget, tag in ((0.44, "b044"), (0.25, "b025")):
        if run is not None and codebook is not None:
            _sample_grid(summ, out, run, codebook, budget, tag)


def _sample_grid(summ, out, run, codebook, budget, tag):
    """Dense beside every policy at one budget: seed 0, the same classes and sampling keys."""
    from PIL import Image
    strips, names = [], []
    for r in summ["rows"]:
        f = run / f"samples_{_fname(r['key'])}.npy"
        if f.is_file() and (r["budget"] is None or abs(r["budget"] - budget) < 0.01):
            t = np.load(f).astype(np.int64)[:8]
            strips.append(np.concatenate(list(lab_data.decode_tokens(t, codebook)), axis=1))
            names.append(_name(r))
    if strips:
        w = max(s.shape[1] for s in strips)
        grid = np.concatenate([np.pad(s, ((2, 2), (0, w - s.shape[1]), (0, 0)), constant_values=255) for s in strips])
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / f"samples_{tag}.png")
        (out / f"samples_{tag}.txt").write_text("rows, top to bottom (seed 0, classes 0-7, same keys):\n"
                                              + "\n".join(names) + "\n")


def report(run: Path, out: Path, *, data_dir: Path | None = None, dataset: str = "emoji-datasource 16.0.0 "
           "(twitter + google), 24x24 k-means tokens", longer: Path | None = None, log=print) -> dict:
    ev = lab_data.read_json(run / "eval.json", ("rows", "model", "seeds"))
    meta = lab_data.read_json(run / "model.json", ("config",))
    summ = summary(ev, meta, dataset)
    tlog = lab_data.read_json(run / "train_log.json", ("eval",), default={}) or None
    longer_conv = None
    if longer is not None:
        try:
            longer_conv = lab_data.read_json(longer, ("model",))["model"].get("convergence")
        except lab_data.DataError as e:
            raise lab_data.DataError(f"--longer-run: {longer} is not a summary.json written by `lab.py report` "
                                     f"({str(e).split(' (')[0]})") from None
        if not longer_conv or "best_heldout_nll" not in longer_conv:
            raise lab_data.DataError(f"report: {longer} has no held-out curve (model.convergence): give a summary.json "
                              "that `lab.py report` wrote for a run with a training log")
    summ["model"]["convergence"] = convergence(tlog, longer_conv)
    if not summ["model"]["convergence"]["flattened"]:
        log("report: held-out NLL has NOT flattened: these rows check the pipeline; they are not evidence")
    conv = summ["model"]["convergence"]
    if summ["training"].get("best_step") is None:  # a run from before training kept its optimum
        summ["training"]["best_step"] = conv.get("best_step")
    if conv.get("overfit"):
        log(f"report: held-out NLL was lowest at step {conv['best_step']} and has risen since: the model overfits")
    verd = verdicts(summ, run)
    summ["verdicts"] = {str(b): v for b, v in verd.items()}
    h2h = head_to_head(summ, run)
    summ["head_to_head"] = {str(b): v for b, v in h2h.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summ, indent=1))
    (out / "table.md").write_text(compact_table(summ) + "\n\nEvery metric:\n\n" + table(summ, verd, h2h) + "\n")
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
