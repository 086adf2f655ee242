"""Seconds per generate call under sets of XLA:GPU flags (GPU), each in a process of its own:
`python3 benchmarks/xla_flag_time.py GROUP [MODEL:PX:BATCH:POLICY[:BUDGET] ...]`, GROUP one of:

- command-buffer: CUDA graphs. A decode step of GPT-XL launches about 300 kernels
  (benchmarks/compiled_kernels.json); at batch 1 each is a few microseconds of work. A profile shows no
  idle time between them (an H100, 2026-12-05), but each launch still has its latency; XLA can replay a
  step's kernels as a CUDA graph, and which kinds of thunk it captures is the flag
  `xla_gpu_enable_command_buffer`. Hopper's programmatic dependent launch (`xla_gpu_enable_pdl`) needs
  no setting: compiled for the H200 target (jaxlib 0.10.2, 2026-12-06), every kernel of a dense
  batch-1 step already begins with `griddepcontrol.wait`, the Pallas kernels included (XLA inserts it).
- fma: fused multiply-adds. XLA:GPU compiles its fusions and the Pallas (Triton) kernels without
  contracting a multiply and an add into one FMA (the PTX holds mul.rn / add.rn, which ptxas keeps
  apart); LLVM's NVPTX option `-nvptx-fma-level=1` lets it contract them. Compiled for the H200 target
  (jaxlib 0.10.2), the adsa-evict step kernel at 384 px batch 64 goes from 1,440 to 1,320 instructions
  (its block loop: 899, of which 250 FADD and 208 FMUL), the kernel without the victim score from 1,176
  to 1,088, at 151 and 96 registers (149, 96 without). Rounding changes wherever a product is summed,
  in every fusion, so the tokens may differ from the default's in a near tie.

Each setting runs `adsa-jax bench` (random weights, bf16, CFG 4, top-k 2000) in its own process
(XLA reads XLA_FLAGS once). Writes $OUT/xla_flag_time_GROUP.json: one row per setting and
configuration with its seconds per call (the bench's median of 5), the setting's XLA_FLAGS, the
device, JAX version and date. benchmarks/xla_flag_time_GROUP.json holds a group's latest run.
"""
import json
import os
import subprocess
import sys
import tempfile

OUT = os.environ.get("OUT", "/tmp/out")
WITH_WHILE = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# group -> (setting name -> the flags added to XLA_FLAGS ('default': none), the default configurations,
# settings timed only at batch 1)
GROUPS = {
    "command-buffer": ({
        "default": "",
        "off": "--xla_gpu_enable_command_buffer=",
        "with-while": WITH_WHILE,
        # the decode loop unrolled into one graph (its trip count is static): batch 1 only, where a
        # step is about 1 ms of small kernels
        "while-unrolled": WITH_WHILE + " --xla_gpu_command_buffer_unroll_loops=true",
    }, ["GPT-XL:256:1:dense", "GPT-XL:256:64:dense", "GPT-XL:384:64:window:0.5"], {"while-unrolled"}),
    "fma": ({
        "default": "",
        "fma": "--xla_backend_extra_options=-nvptx-fma-level=1",
    }, ["GPT-XL:256:64:dense", "GPT-XL:384:64:adsa-evict:0.5", "GPT-XL:384:64:window:0.5"], set()),
}


def group(name: str):
    if name not in GROUPS:
        raise SystemExit(f"xla_flag_time.py: GROUP must be one of {', '.join(GROUPS)}, got {name!r}")
    return GROUPS[name]


def bench(spec: str, flags: str) -> dict:
    model, px, batch, policy, *budget = spec.split(":")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "adsa_jax.cli", "bench", "--model", model, "--image-size", px, "--batch", batch,
               "--policies", policy, "--iters", "5", "--no-roofline", "--json", f.name]
        cmd += ["--budgets", budget[0]] if budget else []
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode:
            return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
        out = json.load(open(f.name))
    row = out["rows"][0]
    return {"device": (out.get("device") or {}).get("device"), "jax": out.get("jax"), "date": out.get("date"),
            "s_per_call": row["s_per_call"], "images_per_s": row["images_per_s"]}


def main(argv):
    if not argv:
        raise SystemExit(f"usage: python3 benchmarks/xla_flag_time.py GROUP [SPEC ...], GROUP one of {', '.join(GROUPS)}")
    settings, specs, only_batch_1 = group(argv[0])
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for spec in argv[1:] or specs:
        for name, flags in settings.items():
            if name in only_batch_1 and spec.split(":")[2] != "1":
                continue
            row = {"spec": spec, "setting": name, "xla_flags": flags, **bench(spec, flags)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(OUT, f"xla_flag_time_{argv[0]}.json"), "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
