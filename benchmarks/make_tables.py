"""Regenerate BENCHMARKS.md's tables from results.json: `python benchmarks/make_tables.py [--check | --add BENCH.json]`.

- no argument: rewrite every generated block of BENCHMARKS.md (between ``<!-- table: NAME -->`` and
  ``<!-- /table -->``) from ``benchmarks/results.json``; the prose around them is left alone;
- ``--check``: exit 1, naming the stale blocks, if BENCHMARKS.md differs from what it would write;
- ``--add BENCH.json [--date YYYY-MM-DD] [--device NAME]``: turn the rows of ``adsa-jax bench --json``
  into results rows (a row of the same configuration is replaced), then rewrite BENCHMARKS.md; a JSON
  list (``benchmarks/llamagen_torch.py --out``) holds results rows already and is added as it is.
  A replaced row that rows of its device and day are compared with (PyTorch's beside dense, a
  ``--batch-invariant`` row beside the option off) stays, marked ``"anchor": true``, for those comparisons
  only, until they are measured again.

Every number in BENCHMARKS.md comes from results.json through this file. A ratio of two measurements
is shown only when both were taken on the same device on the same day; otherwise the cell says so.
Needs only the standard library (no JAX).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
DOC = HERE.parent / "BENCHMARKS.md"

FRAMEWORKS = ("adsa_jax", "torch-eager", "torch-compile")
# key: (types allowed, may it be null)
REQUIRED = {
    "device": (str, False), "date": (str, False), "framework": (str, False), "model": (str, False),
    "image_size": (int, False), "batch": (int, False), "policy": (str, False), "budget": (float, True),
    "granularity": (str, True), "img_per_s": (float, False), "s_per_image": (float, False),
    "peak_gib": (float, True), "memory_cap_gib": (float, True),
}
OPTIONAL = {"s_per_call": (float, False), "floor_s": (float, False), "floor_kernel_s": (float, False),
            "jax": (str, False), "torch": (str, False),
            "type": (str, False), "period": (int, False),  # period: only where s > 1
            "invariant_group": (int, False),  # only for --batch-invariant rows (their own configuration)
            # a row a newer one replaced, kept because rows of its device and day are compared with it
            # (PyTorch's beside dense, --batch-invariant beside the option off): see merge
            "anchor": (bool, False)}
IDENTITY = ("device", "framework", "type", "model", "image_size", "batch", "policy", "budget", "granularity",
            "memory_cap_gib", "period", "invariant_group")

H200 = "NVIDIA H200"
POLICIES = (("dense", None), ("adsa-evict", 0.5), ("window", 0.5), ("adsa-evict", 0.25), ("window", 0.25))
MARKS = ("*", "†", "‡", "§")


class TableError(ValueError):
    """A results row or a BENCHMARKS.md block that cannot be used (the message names it and the fix)."""


# ----------------------------------------------------------------------------- rows


def check_row(i: int, row: dict) -> None:
    """Raise TableError naming row ``i`` and the key if it does not have the schema."""
    if not isinstance(row, dict):
        raise TableError(f"results row {i}: a JSON object expected, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    unknown = [k for k in row if k not in REQUIRED and k not in OPTIONAL]
    if missing or unknown:
        raise TableError(f"results row {i}: missing keys {missing}, unknown keys {unknown} "
                         f"(schema: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})")
    for k, v in row.items():
        types, nullable = REQUIRED.get(k) or OPTIONAL[k]
        ok = (v is None and nullable) or (isinstance(v, bool) if types is bool else
                                          isinstance(v, (int, float)) and not isinstance(v, bool)
                                          if types is float else isinstance(v, types) and not isinstance(v, bool))
        if not ok:
            raise TableError(f"results row {i}: {k}={v!r} is not a{'' if not nullable else ' null or'} "
                             f"{types.__name__}")
    if row["framework"] not in FRAMEWORKS:
        raise TableError(f"results row {i}: framework {row['framework']!r} is not one of {FRAMEWORKS}")
    try:
        datetime.date.fromisoformat(row["date"])
    except ValueError:
        raise TableError(f"results row {i}: date {row['date']!r} is not YYYY-MM-DD") from None
    if (row["budget"] is None) != (row["policy"] == "dense"):
        raise TableError(f"results row {i}: budget must be null for dense and a number for {row['policy']!r}")
    if row["img_per_s"] <= 0 or row["s_per_image"] <= 0 or abs(row["img_per_s"] * row["s_per_image"] - 1) > 0.01:
        raise TableError(f"results row {i}: img_per_s {row['img_per_s']} and s_per_image {row['s_per_image']} "
                         "must be positive and each other's inverse")


def identity(row: dict) -> tuple:
    # A memory-cap row is one search's answer: a new search replaces it whatever batch it found.
    capped_row = row.get("memory_cap_gib") is not None
    key = tuple(None if capped_row and k == "batch" else row.get(k, "c2i" if k == "type" else None) for k in IDENTITY)
    return key + (("anchor", row["date"]) if row.get("anchor") else ())


def needed_beside(row: dict, rows) -> bool:
    """Whether a row of ``rows`` other than ``row`` is compared with it on its device and day: a PyTorch
    row of its configuration (``row`` dense), or its ``--batch-invariant`` variant (``row`` without)."""
    if row["framework"] != "adsa_jax" or row.get("invariant_group") or row.get("memory_cap_gib") is not None:
        return False
    near = [r for r in rows if r is not row and not r.get("anchor") and (r["device"], r["date"], r["model"],
            r["image_size"], r["batch"]) == (row["device"], row["date"], row["model"], row["image_size"], row["batch"])]
    return any((r["framework"] != "adsa_jax" and row["policy"] == "dense")
               or (r.get("invariant_group") and all(r.get(k) == row.get(k) for k in
                                                    ("type", "policy", "budget", "granularity", "period")))
               for r in near)


def check_rows(rows) -> list[dict]:
    if not isinstance(rows, list):
        raise TableError("results.json must hold a JSON list of rows")
    seen = {}
    for i, row in enumerate(rows):
        check_row(i, row)
        key = identity(row)
        if key in seen:
            raise TableError(f"results rows {seen[key]} and {i} measure the same configuration {key}: keep one")
        seen[key] = i
    return rows


def load_rows(path: Path = RESULTS) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TableError(f"cannot read {path}: {e}") from None
    return check_rows(rows)


def dump_rows(rows: list[dict]) -> str:
    """One row per line, so a diff shows which measurements changed."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def rows_from_bench(bench: dict, date: str | None = None, device: str | None = None) -> list[dict]:
    """results rows from the JSON of ``adsa-jax bench --json`` (failed configurations are skipped)."""
    dev = device or ((bench.get("device") or {}).get("device"))
    if not dev:
        raise TableError("the bench JSON names no device (it ran with --no-roofline): pass --device NAME")
    date = date or bench.get("date") or datetime.date.today().isoformat()  # the bench writes its run's date
    out = []
    for r in bench.get("rows", []):
        if "error" in r or r.get("s_per_call") is None:
            continue
        if r.get("dtype", "bfloat16") != "bfloat16" or not r.get("cfg", True):
            raise TableError(f"bench row {r.get('name')} {r.get('policy')} batch {r.get('batch')}: the tables are "
                             "bf16 with CFG; rerun the bench with --dtype bfloat16 and --cfg-scale 4")
        if not r.get("image_size"):
            raise TableError(f"bench row {r.get('name')}: no image size (a JSON config without one); the tables "
                             "hold named sizes, e.g. --model GPT-XL --image-size 384")
        s, b = float(r["s_per_call"]), int(r["batch"])
        row = {"device": dev, "date": date, "framework": "adsa_jax", "model": r["name"],
               "image_size": int(r["image_size"]), "batch": b, "policy": r["policy"],
               "budget": None if r["policy"] == "dense" else r["budget"],
               "granularity": r.get("granularity") or ("head" if r["policy"].startswith("adsa") else None),
               "img_per_s": round(b / s, 3), "s_per_image": round(s / b, 5),
               "peak_gib": round(r["peak_bytes_compiled"] / 2**30, 2) if r.get("peak_bytes_compiled") else None,
               "memory_cap_gib": r.get("memory_cap_gib"), "s_per_call": round(s, 4)}
        if (r.get("period") or 1) > 1:
            row["period"] = int(r["period"])
        if r.get("batch_invariant"):
            row["invariant_group"] = int(r["batch_invariant"])
        for key in ("floor_s", "floor_kernel_s"):  # the kernel floor: benches from 2026-12-05 on
            if r.get(key):
                row[key] = round(float(r[key]), 4)
        if bench.get("jax"):
            row["jax"] = bench["jax"]
        if r.get("type", "c2i") != "c2i":
            row["type"] = r["type"]
        out.append(row)
    return out


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """``rows`` with every configuration in ``new`` replaced by (or added as) its new row, in a stable order."""
    fresh = {identity(r): r for r in new}
    # a replaced row of another day becomes an anchor; every anchor then stays only while something of its
    # day is compared with it, and its configuration's current row is of another day
    kept = [r if identity(r) not in fresh else dict(r, anchor=True) for r in rows
            if identity(r) not in fresh or fresh[identity(r)]["date"] != r["date"]]
    current = [r for r in kept if not r.get("anchor")] + list(fresh.values())
    by_id = {identity(r): r for r in current}
    kept = [r for r in kept if not r.get("anchor") or (needed_beside(r, current) and not same_day(
        r, by_id.get(identity(dict(r, anchor=False)))))]
    order = {f: i for i, f in enumerate(FRAMEWORKS)}
    pol = {p: i for i, p in enumerate(("dense", "adsa-evict", "window"))}
    return check_rows(sorted(kept + list(fresh.values()), key=lambda r: (
        order[r["framework"]], r["device"], r.get("type", "c2i"), r["model"], r["image_size"], r["batch"],
        pol.get(r["policy"], 9), r["policy"], -(r["budget"] or 1), r["granularity"] or "",
        r["memory_cap_gib"] or 0, r.get("anchor", False), r["date"])))


# ----------------------------------------------------------------------------- lookups and formats


def find(rows, *, device=H200, framework="adsa_jax", model="GPT-XL", image_size=256, batch=64, policy="dense",
         budget=None, granularity=None, memory_cap_gib=None, period=None, invariant_group=None, anchor_date=None):
    """The row of one configuration: the current one, or with ``anchor_date`` the anchor of that day."""
    if granularity is None and policy.startswith("adsa"):
        granularity = "head"
    key = identity(dict(device=device, framework=framework, model=model, image_size=image_size, batch=batch,
                        policy=policy, budget=budget, granularity=granularity, memory_cap_gib=memory_cap_gib,
                        period=period, invariant_group=invariant_group, date=anchor_date,
                        anchor=anchor_date is not None))
    return next((r for r in rows if identity(r) == key), None)


def beside(rows, ref, **config):
    """The adsa_jax row of ``config`` to compare with ``ref``: the current one if measured on ref's device
    and day, else the anchor kept from that day (:func:`merge`), else the current one."""
    row = find(rows, device=ref["device"], **config)
    if same_day(row, ref):
        return row
    return find(rows, device=ref["device"], anchor_date=ref["date"], **config) or row


def same_day(*rows) -> bool:
    return all(r is not None for r in rows) and len({(r["device"], r["date"]) for r in rows}) == 1


def ips(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def x_(v: float) -> str:
    return f"{v:.2f}x"


class Dates:
    """The newest date of a table unmarked, each older one a mark and a footnote."""

    def __init__(self, rows):
        dates = sorted({r["date"] for r in rows if r is not None}, reverse=True)
        self.newest = dates[0] if dates else None
        self.marks = {d: MARKS[i] for i, d in enumerate(dates[1:])}

    def mark(self, row) -> str:
        return "" if row is None else self.marks.get(row["date"], "")

    def note(self, device: str) -> str:
        older = "; ".join(f"{m} measured {d}" for d, m in self.marks.items())
        return f"{device}; unmarked cells measured {self.newest}" + (f"; {older}" if older else "") + "."


def md_table(header, lines, text_cols=3) -> list[str]:
    """A Markdown table; the first ``text_cols`` columns left-aligned, the numbers right-aligned."""
    rule = ["---" if i < text_cols else "---:" for i in range(len(header))]
    return ["| " + " | ".join(h) + " |" for h in (header, rule)] + ["| " + " | ".join(line) + " |" for line in lines]


def pol_name(policy, budget) -> str:
    return policy if budget is None else f"{policy} {budget:g}"


# ----------------------------------------------------------------------------- the tables


def t_versions(rows) -> list[str]:
    ours = [r for r in rows if r["framework"] == "adsa_jax" and r["device"] == H200 and not r.get("anchor")]
    jax = sorted({r.get("jax", "?") for r in ours})
    dates = sorted({r["date"] for r in ours})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return [f"Device: {H200} (one GPU). JAX {', '.join(jax)}. Measured {span} ({len(ours)} configurations)."]


def t_throughput(rows, models, batches=(1, 8, 64, 256)) -> list[str]:
    cells = {}
    for m in models:
        for px in (256, 384):
            for b in batches:
                cells[m, px, b] = [find(rows, model=m, image_size=px, batch=b, policy=p, budget=bu) for p, bu in POLICIES]
    d = Dates([r for v in cells.values() for r in v])
    lines = [[m, str(px), str(b)] + [ips(r["img_per_s"]) + d.mark(r) if r else "not measured" for r in v]
             for (m, px, b), v in cells.items()]
    return md_table(["model", "px", "batch"] + [pol_name(*p) for p in POLICIES], lines) + ["", d.note(H200)]


def t_memory(rows) -> list[str]:
    got = {}
    for m in ("GPT-B", "GPT-L", "GPT-XL"):
        for px in (256, 384):
            got[m, px] = [find(rows, model=m, image_size=px, batch=256, policy=p, budget=bu) for p, bu in POLICIES]
    d = Dates([r for v in got.values() for r in v])
    lines = []
    for (m, px), v in got.items():
        dense, line = v[0], [m, str(px)]
        for r in v:
            if r is None or r["peak_gib"] is None:
                line.append("not measured")
            elif r is dense:
                line.append(f"{r['peak_gib']:.2f}{d.mark(r)}")
            else:
                ratio = f" ({x_(r['peak_gib'] / dense['peak_gib'])})" if same_day(r, dense) and dense["peak_gib"] else ""
                line.append(f"{r['peak_gib']:.2f}{d.mark(r)}{ratio}")
        lines.append(line)
    return md_table(["model", "px"] + [pol_name(*p) for p in POLICIES], lines, 2) + ["", d.note(H200)]


def t_floor(rows) -> list[str]:
    got = {(px, b): [find(rows, image_size=px, batch=b, policy=p, budget=bu) for p, bu in POLICIES]
           for px in (256, 384) for b in (64, 256)}
    d = Dates([r for v in got.values() for r in v])
    def cell(r):
        if not r:
            return "not measured"
        if not (r.get("floor_s") and r.get("s_per_call")):
            return "no floor"
        kern = f" (k {x_(r['s_per_call'] / r['floor_kernel_s'])})" if r.get("floor_kernel_s") else ""
        return x_(r["s_per_call"] / r["floor_s"]) + kern + d.mark(r)
    lines = [["GPT-XL", str(px), str(b)] + [cell(r) for r in v] for (px, b), v in got.items()]
    return md_table(["model", "px", "batch"] + [pol_name(*p) for p in POLICIES], lines) + ["", d.note(H200)]


def t_period(rows) -> list[str]:
    """adsa-evict's granularity and eviction period beside the window, GPT-XL 384 px, budget 0.5."""
    cols = [("head", None), ("head", 8), ("layer", None), ("layer", 8)]
    got = {b: [find(rows, image_size=384, batch=b, policy="adsa-evict", budget=0.5, granularity=g, period=s)
               for g, s in cols] + [find(rows, image_size=384, batch=b, policy="window", budget=0.5)]
           for b in (64, 256)}
    d = Dates([r for v in got.values() for r in v])

    def cell(r):
        if r is None:
            return "not measured"
        fl = f" ({x_(r['s_per_call'] / r['floor_s'])})" if r.get("floor_s") and r.get("s_per_call") else ""
        return f"{r['s_per_call']:.3f}{fl}{d.mark(r)}" if r.get("s_per_call") else "not measured"
    lines = [["GPT-XL", "384", str(b)] + [cell(r) for r in v] for b, v in got.items()]
    head = ["adsa-evict 0.5 head", "head s=8", "layer", "layer s=8", "window 0.5"]
    return md_table(["model", "px", "batch"] + head, lines) + ["", d.note(H200)]


def capped(rows, model, px, cap, policy, budget, device=H200):
    """The row a memory-cap search found for one policy (its batch is the largest that fits the cap)."""
    return next((r for r in rows if r["framework"] == "adsa_jax" and r["device"] == device and r["model"] == model
                 and r.get("type", "c2i") == "c2i" and r["image_size"] == px and r["memory_cap_gib"] == cap
                 and r["policy"] == policy and r["budget"] == budget
                 and r["granularity"] == ("head" if policy.startswith("adsa") else None)), None)


def t_cap(rows) -> list[str]:
    """The largest batch each policy fits under a memory cap, and its images/s (against dense: one day),
    on each device measured (the H200 first)."""
    order = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL")
    keys = sorted({(r["model"], r["image_size"], r["memory_cap_gib"], r["device"]) for r in rows
                   if r["memory_cap_gib"] is not None and r["framework"] == "adsa_jax"},
                  key=lambda k: (order.index(k[0]) if k[0] in order else 9, k[0], k[1], k[2], k[3] != H200, k[3]))
    got = {k: [capped(rows, *k[:3], p, bu, device=k[3]) for p, bu in POLICIES] for k in keys}
    d = Dates([r for v in got.values() for r in v])
    lines = []
    for (m, px, cap, dev), v in got.items():
        line = [m, str(px), f"{cap:g}", dev.removeprefix("NVIDIA ")]  # as the torch table names it
        for r in v:
            if r is None:
                line.append("not measured")
                continue
            ratio = f", {x_(r['img_per_s'] / v[0]['img_per_s'])}" if r is not v[0] and same_day(r, v[0]) else ""
            line.append(f"{r['batch']}: {ips(r['img_per_s'])}{ratio}{d.mark(r)}")
        lines.append(line)
    if not lines:
        return ["Not measured."]
    return md_table(["model", "px", "cap GiB", "device"] + [pol_name(*p) for p in POLICIES], lines, text_cols=4) + [
        "", d.note("Ratios within one device and day")]


def t_torch(rows) -> list[str]:
    """PyTorch LlamaGen beside adsa_jax dense, GPT-XL: the configurations adsa_jax ran on the same device
    and day (results.json keeps the others), with a ratio only for one device and day."""
    order = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL")
    torch = [r for r in rows if r["framework"].startswith("torch") and r["model"] == "GPT-XL"]
    configs = sorted({(r["device"], r["model"], r["image_size"], r["batch"]) for r in torch},
                     key=lambda c: (c[0], order.index(c[1]) if c[1] in order else 9, c[1], c[2], c[3]))
    lines = []
    for dev, m, px, b in configs:
        e, c = (find(rows, device=dev, framework=f, model=m, image_size=px, batch=b)
                for f in ("torch-eager", "torch-compile"))
        j = beside(rows, c or e, model=m, image_size=px, batch=b)
        if not (same_day(j, e) or same_day(j, c)):
            continue
        when = "; ".join(sorted({f"{r['device'].removeprefix('NVIDIA ')}, {r['date']}" for r in (e, c) if r}))

        def vs(t):
            return "" if t is None or j is None else x_(j["img_per_s"] / t["img_per_s"]) if same_day(j, t) else "other day"

        lines.append([m, str(px), str(b), when,
                      ips(e["img_per_s"]) if e else "", f"{e['peak_gib']:g}" if e and e["peak_gib"] else "",
                      ips(c["img_per_s"]) if c else "", f"{c['peak_gib']:g}" if c and c["peak_gib"] else "",
                      ips(j["img_per_s"]), vs(e), vs(c)])
    head = ["model", "px", "batch", "device, date", "eager images/s", "eager peak GiB", "compile images/s",
            "compile peak GiB", "adsa_jax images/s", "adsa_jax / eager", "adsa_jax / compile"]
    return md_table(head, lines, 4) + ["", "Empty: not measured."]


def t_targets(rows) -> list[str]:
    xl = lambda **kw: find(rows, model="GPT-XL", **kw)  # noqa: E731
    out = []

    def add(issue, target, value, met):
        verdict = met if isinstance(met, str) else {True: "met", False: "**missed**", None: "not measured"}[met]
        out.append([issue, target, value, verdict])

    def thresh(row, what, limit, above):
        if row is None:
            return "", None
        v = row[what]
        shown = ips(v) + " images/s" if what == "img_per_s" else f"{v:.3f} s"
        return shown, (v >= limit if above else v <= limit)

    def rel(num, den, what="img_per_s"):  # num / den, only for one device and day
        if num is None or den is None:
            return None
        return num[what] / den[what] if same_day(num, den) else "days"

    def rel_text(parts, limit, above=True):  # parts: (label, ratio | None | "days"); verdict from same-day ratios
        shown = [(lab, v) for lab, v in parts if v is not None]
        if not shown:
            return "", None
        vals = [v for _, v in shown if v != "days"]
        missed = any(v < limit if above else v > limit for v in vals)
        met = bool(vals) and len(vals) == len(parts) and not missed
        text = "; ".join(f"{x_(v)} at {lab}" if v != "days" else f"{lab}: measured on different days"
                         for lab, v in shown)
        return text, False if missed else (True if met else None)

    def share(b, budget):  # the selection's share of a call: (adsa-evict - window) / adsa-evict
        e, w = xl(image_size=384, batch=b, policy="adsa-evict", budget=budget), \
            xl(image_size=384, batch=b, policy="window", budget=budget)
        if e is None or w is None:
            return None
        return (e["s_per_image"] - w["s_per_image"]) / e["s_per_image"] if same_day(e, w) else "days"

    # issue 5's speed and share targets that issue 25 raised (dense at 256 px, the selection's share)
    # are shown at issue 25's values only
    d64, d256, d1 = xl(batch=64), xl(batch=256), xl(batch=1)
    if d64 and d64.get("floor_s"):
        f = d64["s_per_call"] / d64["floor_s"]
        add("5", "dense, 256 px, batch 64: within 1.5x of its roofline floor", x_(f), f <= 1.5)
    add("5", "adsa-evict 0.5, 384 px: at least 1.3x dense images/s (batch 64, 256)", *rel_text(
        [(f"batch {b}", rel(xl(image_size=384, batch=b, policy="adsa-evict", budget=0.5), xl(image_size=384, batch=b)))
         for b in (64, 256)], 1.3))
    e, dn = xl(image_size=384, batch=256, policy="adsa-evict", budget=0.5), xl(image_size=384, batch=256)
    add("5", "adsa-evict 0.5, 384 px, batch 256: peak memory at most 0.6x dense",
        *rel_text([("batch 256", rel(e, dn, "peak_gib"))], 0.6, above=False))
    # issue 25
    worst, missing, kern = None, False, []
    for b in (64, 256):
        for p, bu in POLICIES:
            r = xl(image_size=384, batch=b, policy=p, budget=bu)
            if r is None or not r.get("floor_s"):
                missing = True
                continue
            f = r["s_per_call"] / r["floor_s"]
            if worst is None or f > worst[0]:
                worst = (f, f"{pol_name(p, bu)}, batch {b}")
            kern.append(r["s_per_call"] / r["floor_kernel_s"] if r.get("floor_kernel_s") else None)
    if worst:
        # the kernel floor only where every row recorded it (benches from 2026-12-05 on): shown, not judged
        k = f"; over the kernel floor, worst {x_(max(kern))}" if kern and None not in kern else ""
        add("25", "384 px, batch 64 and 256: every policy within 1.3x of its floor",
            f"worst {x_(worst[0])} ({worst[1]}){k}", None if missing and worst[0] <= 1.3 else worst[0] <= 1.3)
    head = xl(image_size=384, batch=64, policy="adsa-evict", budget=0.5)
    layer = xl(image_size=384, batch=64, policy="adsa-evict", budget=0.5, granularity="layer")
    layer8 = xl(image_size=384, batch=64, policy="adsa-evict", budget=0.5, granularity="layer", period=8)
    text, met = rel_text([("period 1", rel(layer, head, "s_per_image")),
                          ("period 8", rel(layer8, head, "s_per_image"))], 1.1, above=False)
    r1, r8 = rel(layer, head, "s_per_image"), rel(layer8, head, "s_per_image")
    if isinstance(r1, float) and isinstance(r8, float) and r1 > 1.1 >= r8:
        met = "met at period 8 only"
    add("25", "adsa-evict at layer granularity: at most 1.1x the time of head at period 1 (384 px, batch 64, 0.5)",
        text, met)
    add("25", "adsa-evict at least 0.92x window images/s at the same budget (384 px)", *rel_text(
        [(f"batch {b} budget {bu:g}", rel(xl(image_size=384, batch=b, policy="adsa-evict", budget=bu),
                                    xl(image_size=384, batch=b, policy="window", budget=bu)))
         for b in (64, 256) for bu in (0.5, 0.25)
         if xl(image_size=384, batch=b, policy="adsa-evict", budget=bu)], 0.92))
    s = share(64, 0.5)
    add("25", "the selection's share of a call under 8% (384 px, batch 64, budget 0.5)",
        *(("", None) if s is None else ("measured on different days", None) if s == "days" else (f"{s:.1%}", s < 0.08)))
    caps = sorted({(r["image_size"], r["memory_cap_gib"]) for r in rows
                   if r["memory_cap_gib"] is not None and r["model"] == "GPT-XL"})
    pairs = [(f"{px} px, {cap:g} GiB", capped(rows, "GPT-XL", px, cap, "adsa-evict", 0.5),
              capped(rows, "GPT-XL", px, cap, "dense", None)) for px, cap in caps]
    text, met = rel_text([(lab, rel(e, d)) for lab, e, d in pairs], 1.5)
    # The same two batches at their roofline floors (images per floor second): what the bytes allow.
    bound = [f"{x_((e['batch'] / e['floor_s']) / (d['batch'] / d['floor_s']))} at {lab}" for lab, e, d in pairs
             if e and d and e.get("floor_s") and d.get("floor_s")]
    add("25", "adsa-evict 0.5 at least 1.5x dense images/s under one memory cap (GPT-XL 384 and 512 px)",
        text + (f" (at both batches' floors: {'; '.join(bound)})" if text and bound else ""), met)
    add("25", "dense, 256 px, batch 1: at most 0.18 s per image", *thresh(d1, "s_per_image", 0.18, False))
    add("25", "dense, 256 px, batch 64: at least 150 images/s", *thresh(d64, "img_per_s", 150, True))
    add("25", "dense, 256 px, batch 256: at least 220 images/s", *thresh(d256, "img_per_s", 220, True))
    ratios = []
    for px, b in ((256, 1), (256, 64), (256, 256), (384, 64)):
        t = find(rows, framework="torch-compile", image_size=px, batch=b)  # on the H200, as the tables
        j = beside(rows, t, model="GPT-XL", image_size=px, batch=b) if t else None
        if t is not None and j is not None:
            ratios.append((f"{px} px batch {b}", rel(j, t)))
    text, met = rel_text(ratios, 0.0) if ratios else ("", None)  # a ratio to report, no threshold
    add("25", "adsa_jax / torch.compile images/s, one machine and day (GPT-XL 256 px batch 1, 64, 256; 384 px "
        "batch 64)", text, "reported" if met else "not measured")
    slow = []  # --batch-invariant against the same configuration without it: a cost, no threshold
    for pol, bu in (("dense", None), ("adsa-evict", 0.5)):
        inv = xl(image_size=384, batch=64, policy=pol, budget=bu, invariant_group=32)
        if inv is not None:
            slow.append((f"{pol_name(pol, bu)} {inv['s_per_call']:.3f} s",
                         rel(inv, beside(rows, inv, model="GPT-XL", image_size=384, batch=64, policy=pol, budget=bu),
                             "s_per_call")))
    text = "; ".join(f"{lab}, {x_(v)} the time" if isinstance(v, float) else f"{lab} (without it: another day)"
                     for lab, v in slow if v is not None)
    add("27", "--batch-invariant (groups of 32) against the option off, seconds per call (384 px, batch 64)",
        text, "reported" if text else "not measured")
    return md_table(["issue", "target (GPT-XL, H200)", "measured", "verdict"], out, 4) + [
        "", "From the rows of the tables above (their dates are marked there); a ratio only of two rows of one day."]


TABLES = {
    "versions": t_versions,
    "throughput-xl": lambda rows: t_throughput(rows, ("GPT-XL",)),
    "throughput-bl": lambda rows: t_throughput(rows, ("GPT-B", "GPT-L"), (1, 64, 256)),
    "memory": t_memory,
    "floor": t_floor,
    "period": t_period,
    "cap": t_cap,
    "targets": t_targets,
    "torch": t_torch,
}

BLOCK = re.compile(r"(<!-- table: ([a-z0-9-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(doc: str, rows: list[dict]) -> str:
    """``doc`` with every generated block rewritten from ``rows``."""
    names = [m.group(2) for m in BLOCK.finditer(doc)]
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise TableError(f"BENCHMARKS.md names unknown tables {unknown}; known: {', '.join(TABLES)}")
    return BLOCK.sub(lambda m: m.group(1) + "\n".join(TABLES[m.group(2)](rows)) + "\n" + m.group(4), doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md is not what this would write")
    p.add_argument("--add", metavar="BENCH.json", help="add the rows of `adsa-jax bench --json BENCH.json` first")
    p.add_argument("--date", default=None, help="with --add: the measurement date, YYYY-MM-DD (default: today)")
    p.add_argument("--device", default=None, help="with --add: the device name, if the bench JSON has none")
    a = p.parse_args(argv)
    try:
        rows = load_rows()
        if a.add:
            try:
                bench = json.loads(Path(a.add).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TableError(f"--add: cannot read {a.add}: {e}") from None
            # a JSON list: rows already in the results schema (benchmarks/llamagen_torch.py --out)
            new = check_rows(bench) if isinstance(bench, list) else rows_from_bench(bench, a.date, a.device)
            if not new:
                raise TableError(f"--add: {a.add} has no successful bench rows")
            rows = merge(rows, new)
            RESULTS.write_text(dump_rows(rows))
            print(f"{len(new)} rows added or replaced in {RESULTS}")
        doc = DOC.read_text()
        new_doc = render(doc, rows)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check:
        if new_doc != doc:
            stale = [m.group(2) for m, n in zip(BLOCK.finditer(doc), BLOCK.finditer(new_doc)) if m.group(0) != n.group(0)]
            print(f"BENCHMARKS.md is stale in {stale}: run python benchmarks/make_tables.py", file=sys.stderr)
            return 1
        return 0
    if new_doc != doc:
        DOC.write_text(new_doc)
        print(f"rewrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
