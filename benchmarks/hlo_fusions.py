"""Which ops each of a profile's busiest kernels runs: for the top N names of prof_*.json, the
fusion instruction and the computation it calls, from the compiled HLO text (hlo_*.txt.gz).

    python3 benchmarks/hlo_fusions.py HLO.txt.gz PROF.json [N]
"""
import gzip
import json
import re
import sys


def strip(line):
    return re.sub(r", metadata=\{[^}]*\}", "", line)


def main():
    hlo = gzip.open(sys.argv[1], "rt").read()
    prof = json.load(open(sys.argv[2]))
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    comps = {}  # computation name -> its text
    for m in re.finditer(r"^(?:%)?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.S | re.M):
        comps[m.group(1)] = m.group(2)
    for name, us in sorted(prof["agg"].items(), key=lambda kv: -kv[1])[:n]:
        per = us / prof["cnt"][name]
        print(f"== {name}: {us / 1e3:.1f} ms, {prof['cnt'][name]}x, {per:.1f} us each")
        # Kernel names spell the instruction's ".N" suffix "_N" (gemm_fusion_dot_760 = gemm_fusion_dot.760).
        for cand in (name, re.sub(r"_(\d+)$", r".\1", name)):
            m = re.search(rf"^\s*(?:ROOT )?%?{re.escape(cand)} = ([^\n]*)", hlo, re.M)
            if m:
                break
        if not m:
            print("   (not an HLO instruction name)")
            continue
        line = strip(m.group(1))
        print("  ", line[:700])
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called and called.group(1) in comps:
            body = comps[called.group(1)].strip().splitlines()
            for b in body[:14]:
                print("      ", strip(b.strip())[:220])
            if len(body) > 14:
                print(f"       ... {len(body) - 14} more lines")


if __name__ == "__main__":
    main()
