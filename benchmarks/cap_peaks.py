"""Compiled peak memory by batch for `adsa-jax bench --memory-cap`, without a GPU: the batch searches
of each configuration run here against programs compiled for the H200 target, and their peaks go
to a file that `bench --memory-cap ... --peak-hints FILE` starts from, so the GPU compiles only
the batches it times (and checks their peaks) instead of searching.

    python3 benchmarks/cap_peaks.py [--configs GPT-XL:384,GPT-XL:512,GPT-XXL:384]
        [--policies dense,adsa-evict,window] [--budgets 0.5,0.25] [--caps 40,132.81]
        [--workers 2] [--out benchmarks/cap_peaks_h200.json]
    python3 benchmarks/cap_peaks.py --table   (no compile: the file's largest batches as markdown,
        into benchmarks/cap_peaks_h200.md)

Needs jax's CUDA plugin, as benchmarks/compiled_kernels.py (whose compile it uses: its docstring says
how). The caps are GiB: 40, and 132.81 for the whole H200 as `run_perf_grid.sh 6` gives it (its
allocator limit at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, as bench printed it on 2026-12-06; the peaks
compiled here for it equal the H200's own: 132.658, 132.712 and 132.815 GiB); a device whose limit
differs needs a few compiles more there. A program compiled here had the peak the H200 compiled (GPT-XL 384 px batch
191 dense 39.87 GiB; adsa-evict 0.5 fits at 369, not at 370, as measured there); XLA versions may
differ a little, which is why bench compiles the batch it runs. Rewrites the file after each
configuration, keeping the others' peaks.
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compiled_kernels as ck  # noqa: E402  (sets JAX_PLATFORMS=cpu before jax starts)
import jax  # noqa: E402

from adsa_jax.bench import GIB, BatchSearch, compiled_peak_bytes, peak_hint_key, policy_items  # noqa: E402
from adsa_jax.config import named_config  # noqa: E402


def peak_of(spec: str, target: str) -> int:
    return compiled_peak_bytes(ck.compile_for_target(spec, target)[0])  # as bench's searches count it


def largest(peaks: dict, cap_bytes: int):
    """The largest batch of {batch: bytes} whose peak fits, if the next batch is known not to."""
    fits = [int(b) for b, p in peaks.items() if p <= cap_bytes]
    over = [int(b) for b, p in peaks.items() if p > cap_bytes]
    lo = max(fits, default=0)
    return lo if lo and any(b == lo + 1 for b in over) else None


def table(doc: dict) -> str:
    """Markdown: per configuration and cap, the largest batch each policy fits (compiled, not run)."""
    caps = doc["caps_gib"]
    keys = list(doc["peaks"])
    configs = list(dict.fromkeys(":".join(k.split(":")[:2]) for k in keys))
    pols = list(dict.fromkeys(":".join(k.split(":")[2:4]) for k in keys))
    head = [f"{p.split(':')[0]} {p.split(':')[1]}".replace(" None", "") for p in pols]
    lines = ["| model | px | cap GiB | " + " | ".join(head) + " |", "| --- | --- | --- |" + " ---: |" * len(pols)]
    for config in configs:
        for cap in caps:
            cells = []
            for p in pols:
                key = next((k for k in keys if k.startswith(f"{config}:{p}:")), None)
                b = largest(doc["peaks"][key], int(cap * GIB)) if key else None
                cells.append(str(b) if b else "-")
            lines.append(f"| {config.replace(':', ' | ')} | {cap:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="GPT-XL:384,GPT-XL:512,GPT-XXL:384")
    ap.add_argument("--policies", default="dense,adsa-evict,window")
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--caps", default="40,132.81", help="GiB")
    ap.add_argument("--workers", type=int, default=2, help="compiles at once (threads)")
    ap.add_argument("--target", default=os.path.join(HERE, "h200_target.txtpb"))
    ap.add_argument("--out", default=os.path.join(HERE, "cap_peaks_h200.json"))
    ap.add_argument("--table", action="store_true", help="write --out's table as markdown beside it; no compile")
    a = ap.parse_args(argv)
    if a.table:
        with open(a.out) as f:
            doc = json.load(f)
        md = os.path.splitext(a.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(f"Largest batch under each memory cap, compiled for the H200 target without a GPU (jax "
                    f"{doc['jax']}, {doc['date']}; `python3 benchmarks/cap_peaks.py`, then `--table`); not run, "
                    "not timed (`bench --memory-cap` times them: BENCHMARKS.md).\n\n" + table(doc))
        print(open(md).read())
        return
    target = open(a.target).read()
    caps = [float(c) for c in a.caps.split(",")]
    doc = {"target": os.path.basename(a.target), "jax": jax.__version__, "date": datetime.date.today().isoformat(),
           "caps_gib": caps, "peaks": {}}
    if os.path.exists(a.out):
        with open(a.out) as f:
            doc["peaks"] = json.load(f).get("peaks", {})
    pool = concurrent.futures.ThreadPoolExecutor(a.workers)
    for config in a.configs.split(","):
        name, px = config.split(":")
        cfg = named_config(name, image_size=int(px))
        items = policy_items(cfg, a.policies.split(","), [float(b) for b in a.budgets.split(",")])
        for item in items:
            key = peak_hint_key(name, int(px), item)
            known = {int(b): p for b, p in doc["peaks"].get(key, {}).items()}
            searches = [BatchSearch(int(c * GIB)) for c in caps]
            tail = "" if item["budget"] is None else f":{item['budget']}:{item['granularity'] or 'head'}:{item['period']}"
            while True:
                want = sorted({b for s in searches for b in s.candidates(known)})
                if not want:
                    break
                for b, p in zip(want, pool.map(lambda b: peak_of(f"{name}:{px}:{b}:{item['policy'].name}{tail}",
                                                                 target), want)):
                    known[b] = p
                    print(f"{key} batch {b}: {p / GIB:.3f} GiB", flush=True)
            chosen = [s.bracket(known)[0] for s in searches]
            print(f"{key}: largest batch " + ", ".join(f"{b} under {c:g} GiB" for b, c in zip(chosen, caps)),
                  flush=True)
            doc["peaks"][key] = {str(b): int(p) for b, p in sorted(known.items())}
            with open(a.out, "w") as f:
                json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
