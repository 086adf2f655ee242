"""What XLA:GPU compiles for one generate call, on a machine without a GPU: kernel launches per
loop iteration and copies of 1 MiB or more, read from the optimized HLO.

    python3 benchmarks/compiled_kernels.py [--target benchmarks/h200_target.txtpb] [--out FILE]
        MODEL:PX:BATCH:POLICY[:BUDGET[:GRAN[:PERIOD]]] ...

Needs jax's CUDA plugin at the version of the installed jax, best in a venv of its own (4 GB, no
GPU needed): `pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"`; it
runs with JAX_PLATFORMS=cpu and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (set here), compiling for the
device described by --target (an XLA GpuTargetConfig; the H200's is beside this script) with the
kernels a GPU call resolves ('auto': the Pallas kernels). It imports adsa_jax from the working
directory, so running it from a checkout of another commit compares the two programs.

A generate call is one XLA program whose decode steps are `while` loops: each row lists the
loops, nested, with the kernels one iteration launches (cuBLAS GEMMs, Pallas/Triton kernels,
XLA fusions, copies). It does not time anything: a launch on the GPU costs a few microseconds,
a copy of the whole KV cache costs its bytes at the device's bandwidth. XLA versions differ in
what they fuse, so compare programs compiled by one jax version; the GPU machine's may differ.
"""
import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin compiles; no device is opened
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here to report versions
sys.path.insert(0, os.getcwd())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Instructions that launch nothing on the GPU (tuple plumbing, aliases, compile-time constants).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
INSTR = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z\-]+)\((.*)$")


def computations(hlo_text: str) -> tuple[dict, str]:
    """({computation: [(result shape, opcode, rest of line)]}, the entry computation's name)."""
    comps, cur, entry = {}, None, None
    for line in hlo_text.splitlines():
        m = HEADER.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            mi = INSTR.match(line)
            if mi:
                comps[cur].append(mi.groups())
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def kernel_kind(shape: str, op: str, rest: str, least_copy: int) -> str | None:
    """A launch's kind, or None for an instruction that launches nothing."""
    if op in FREE:
        return None
    if op == "fusion":
        return "fusion:" + re.search(r"kind=(\w+)", rest).group(1)
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
        return {"__cublas$lt$matmul": "cublas", "__cublas$gemm": "cublas",
                "__gpu$xla.gpu.triton": "pallas/triton"}.get(target, "custom-call:" + target)
    if op in ("copy", "copy-start"):
        m = re.match(r"(\w+)\[([0-9,]*)\]", shape)
        size = BYTES.get(m.group(1), 4) * math.prod(int(x) for x in m.group(2).split(",") if x) if m else 0
        return f"copy {m.group(0)}" if size >= least_copy else "copy (small)"
    return op


def loop_tree(comps: dict, name: str, least_copy: int = 1 << 20) -> dict:
    """{"launches": this computation's own launches, "kinds": {kind: n}, "loops": [nested loops]}:
    a while loop's body counts once (one iteration), a conditional's branches are listed apart."""
    kinds, loops = collections.Counter(), []
    for shape, op, rest in comps[name]:
        if op == "while":
            loops.append(loop_tree(comps, re.search(r"body=%([\w.\-]+)", rest).group(1), least_copy))
        elif op == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else re.findall(
                r"(?:true|false)_computation=%([\w.\-]+)", rest)
            kinds["conditional"] += 1
            loops.extend(dict(loop_tree(comps, b, least_copy), branch=True) for b in names)
        else:
            k = kernel_kind(shape, op, rest, least_copy)
            if k:
                kinds[k] += 1
    return {"launches": sum(kinds.values()), "kinds": dict(kinds.most_common()), "loops": loops}


def describe(tree: dict, depth: int = 0) -> list[str]:
    """One line per computation, nested loops indented."""
    what = "branch" if tree.get("branch") else "program" if depth == 0 else "loop iteration"
    kinds = ", ".join(f"{k} {v}" for k, v in tree["kinds"].items())
    lines = [f"{'    ' * depth}{what}: {tree['launches']} launches ({kinds})"]
    for sub in tree["loops"]:
        lines += describe(sub, depth + 1)
    return lines


def compile_for_target(spec: str, target: str):
    """The compiled generate program of one spec for the device ``target`` describes, and its kernels."""
    from jax.experimental import topologies

    import adsa_jax
    from adsa_jax.bench import _scalars
    from adsa_jax.config import named_config
    from adsa_jax.generate import generate_program, with_kernels
    from adsa_jax.model import init_params
    from adsa_jax.options import kernel_config

    model, px, batch, pol, *rest = spec.split(":")
    if len(rest) > 3 or (pol != "dense" and not rest):
        raise SystemExit(f"compiled_kernels.py: {spec!r} is not MODEL:PX:BATCH:POLICY[:BUDGET[:GRAN[:PERIOD]]] "
                         "(a policy other than dense needs its budget)")
    cfg, batch = named_config(model, image_size=int(px)), int(batch)
    kw = {} if pol == "dense" else {"budget": float(rest[0]), "granularity": rest[1] if len(rest) > 1 else "head",
                                   **({"period": int(rest[2])} if len(rest) > 2 else {})}
    policy = adsa_jax.make_policy(cfg, pol, **kw)
    topo = topologies.get_topology_desc(platform="cuda", topology_name="target", target_config=target,
                                        topology="1x1x1")
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_target = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)  # noqa: E731
    params = jax.tree.map(on_target, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16)))
    sampling = adsa_jax.SamplingConfig()
    kc = kernel_config(cfg, policy, 2 * batch if sampling.guided else batch, jnp.bfloat16, backend="gpu", pallas=True)
    args = (jnp.zeros((batch,), jnp.int32), jnp.ones((batch, 1), bool), jax.random.key(0),
            jnp.zeros((batch,), jnp.int32), _scalars(sampling))
    args = jax.tree.map(on_target, jax.eval_shape(lambda: args))
    t0 = time.perf_counter()
    compiled = generate_program(kc).lower(params, *args, cfg=cfg, policy=with_kernels(policy, kc),
                                          use_cfg=sampling.guided, kernels=kc,
                                          top_p_on=sampling.top_p_on).compile()
    return compiled, time.perf_counter() - t0, kc


def commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+", help="MODEL:PX:BATCH:POLICY[:BUDGET[:GRAN[:PERIOD]]]")
    ap.add_argument("--target", default=os.path.join(HERE, "h200_target.txtpb"), help="GpuTargetConfig text")
    ap.add_argument("--out", help="append the rows to this JSON list (created if missing)")
    a = ap.parse_args(argv)
    try:
        target = open(a.target).read()
    except OSError as e:
        raise SystemExit(f"compiled_kernels.py: cannot read --target {a.target}: {e.strerror}")
    device = re.search(r'device_description_str: "([^"]+)"', target)
    rows = []
    for spec in a.specs:
        print(f"{spec}: compiling for {device.group(1) if device else a.target} ...", flush=True)
        try:
            compiled, seconds, kc = compile_for_target(spec, target)
        except NotImplementedError as e:  # no CUDA plugin: jax has no 'cuda' topology
            raise SystemExit(f"compiled_kernels.py: this jax cannot compile for a GPU without one ({e}); install "
                             f'its CUDA plugin: pip install "jax[cuda13]=={jax.__version__}"')
        comps, entry = computations(compiled.as_text())
        tree = loop_tree(comps, entry)
        print("\n".join(describe(tree)), flush=True)
        rows.append({"spec": spec, "commit": commit(), "jax": jax.__version__,
                     "target": device.group(1) if device else a.target, "compile_s": round(seconds, 1),
                     "kernels": {"attention": kc.attention, "gemm": kc.gemm, "kth": kc.kth}, "program": tree})
    if a.out:
        old = json.load(open(a.out)) if os.path.exists(a.out) else []
        with open(a.out, "w") as f:
            json.dump(old + rows, f, indent=1)


if __name__ == "__main__":
    main()
