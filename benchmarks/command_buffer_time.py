"""Seconds per generate call under XLA:GPU's command-buffer settings (CUDA graphs) (GPU):
`python3 benchmarks/command_buffer_time.py [MODEL:PX:BATCH:POLICY[:BUDGET] ...]`.

A decode step of GPT-XL launches about 300 kernels (benchmarks/compiled_kernels.json); at batch 1
each is a few microseconds of work. A profile shows no idle time between them (an H100, 2026-12-05),
but each launch still has its latency; XLA can replay a step's kernels as a CUDA graph, and which
kinds of thunk it captures is the flag `xla_gpu_enable_command_buffer`. This measures whether that pays.
Hopper's programmatic dependent launch (`xla_gpu_enable_pdl`) needs no setting here: compiled for the
H200 target (jaxlib 0.10.2, 2026-12-06), every kernel of a dense batch-1 step already begins with
`griddepcontrol.wait`, the Pallas kernels included (XLA inserts it), so that overlap is on by default.
Each setting runs `adsa-jax bench` in a process of its own (XLA reads XLA_FLAGS once), random
weights, bf16, CFG 4, top-k 2000. Writes $OUT/command_buffer_time.json: one row per setting and
configuration with its seconds per call (the bench's median), the setting's XLA_FLAGS, the device,
JAX version and date. benchmarks/command_buffer_time.json holds the latest run.
"""
import json
import os
import subprocess
import sys
import tempfile

OUT = os.environ.get("OUT", "/tmp/out")
# name -> the flags added to XLA_FLAGS ('default': none, whatever this XLA does by default)
WITH_WHILE = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
SETTINGS = {
    "default": "",
    "off": "--xla_gpu_enable_command_buffer=",
    "with-while": WITH_WHILE,
    # the decode loop unrolled into one graph (its trip count is static): batch 1 only, where a
    # step is about 1 ms of small kernels
    "while-unrolled": WITH_WHILE + " --xla_gpu_command_buffer_unroll_loops=true",
}
ONLY_BATCH_1 = {"while-unrolled"}
SPECS = ["GPT-XL:256:1:dense", "GPT-XL:256:64:dense", "GPT-XL:384:64:window:0.5"]


def bench(spec: str, flags: str) -> dict:
    model, px, batch, policy, *budget = spec.split(":")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "adsa_jax.cli", "bench", "--model", model, "--image-size", px, "--batch", batch,
               "--policies", policy, "--no-roofline", "--json", f.name] + (["--budgets", budget[0]] if budget else [])
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode:
            return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
        out = json.load(open(f.name))
    row = out["rows"][0]
    return {"device": out.get("device"), "jax": out.get("jax"), "date": out.get("date"),
            "s_per_call": row["s_per_call"], "images_per_s": row["images_per_s"]}


def main(specs):
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for spec in specs:
        for name, flags in SETTINGS.items():
            if name in ONLY_BATCH_1 and spec.split(":")[2] != "1":
                continue
            row = {"spec": spec, "setting": name, "xla_flags": flags, **bench(spec, flags)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(OUT, "command_buffer_time.json"), "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:] or SPECS)
