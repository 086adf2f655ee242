"""One process of the two-process runs of tests/test_multiprocess.py (2 fake CPU devices each,
jax.distributed over 127.0.0.1). Run by that test, not by hand:

    python tests/multiprocess_worker.py PHASE PROCESS_ID PORT SHARED OWN C2I VQ TP

PHASE 'npz' runs the resumable --npz sample only (the test kills it mid-run); 'all' resumes it,
then writes --tokens-out / --out / --out-dir (and bf16 --batch-invariant tokens) (relative paths: OWN is the working directory, so
anything process 1 wrote would show there), generates through the Python API on a 4-device
mesh and a 2 x 2 (data x model) mesh, gathered, and records every path this process opened for
writing (a Python audit hook) in OWN/writes.json.
"""
from __future__ import annotations

import json
import os
import sys

# Shared by the test's single-process reference runs.
SAMPLE = ["--dtype", "float32", "--top-k", "100", "--seed", "3"]
NPZ_RUN = ["--num-samples", "24", "--batch-size", "4"]  # 6 batches: long enough to be killed mid-run
IMAGES_RUN = ["--num-samples", "8", "--batch-size", "4"]
TP_RUN = ["--num-samples", "4", "--batch-size", "4"]
# bf16 is the same across processes only with --batch-invariant: 1 image per device here, groups of 2
BF16_RUN = ["--dtype", "bfloat16", "--top-k", "100", "--seed", "3", "--batch-invariant", "--invariant-group", "2",
            "--num-samples", "8", "--batch-size", "4"]
TP_CFG = dict(dim=128, n_layer=2, n_head=4, vocab_size=4096, num_classes=10, block_size=36)


def _record_writes(log: list):
    """Every file this process opens for writing or renames onto (numpy, PIL and the atomic writers
    all go through open / os.replace)."""
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                log.append(os.path.abspath(os.fsdecode(args[0])))
        elif event == "os.rename":
            log.append(os.path.abspath(os.fsdecode(args[1])))

    sys.addaudithook(hook)


def main(phase, pid, port, shared, own, c2i, vq, tp):
    os.chdir(own)
    writes: list = []
    _record_writes(writes)

    import jax
    import numpy as np

    import adsa_jax
    from adsa_jax.cli import main as cli
    from adsa_jax.sharding import make_mesh, to_host

    dist = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", pid]
    gpt = ["--gpt", c2i, "--vq", vq, *SAMPLE]

    def run(argv):
        rc = cli(argv)
        if rc != 0:
            raise SystemExit(f"process {pid}: `adsa-jax {' '.join(argv)}` exited with {rc}")

    run(["sample", "--gpt", c2i, *SAMPLE, *NPZ_RUN, "--npz", os.path.join(shared, "run.npz"), *dist])  # tokens
    if phase == "npz":
        return
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
    run(["sample", *gpt, *IMAGES_RUN, "--tokens-out", "tokens.npy", "--out", "grid.png", "--out-dir", "pngs", *dist])
    run(["sample", "--gpt", tp, *SAMPLE, *TP_RUN, "--data-parallel", "2", "--tensor-parallel", "2",
         "--tokens-out", "tp_tokens.npy", *dist])
    run(["sample", "--gpt", c2i, *BF16_RUN, "--tokens-out", "bf16_tokens.npy", *dist])

    # The Python API: a global mesh over both processes' devices, tokens gathered on every process.
    sampling = adsa_jax.SamplingConfig(top_k=100)
    labels = np.arange(4) % 10
    mesh = make_mesh(data=4)
    m = adsa_jax.load(c2i, dtype="float32", mesh=mesh)
    toks = adsa_jax.generate(m, labels, jax.random.key(3), sampling=sampling, mesh=mesh)
    assert not toks.is_fully_addressable  # rows live on both processes
    np.save(f"api.p{pid}.npy", to_host(toks))
    mesh = make_mesh(data=2, model=2)
    m = adsa_jax.load(tp, dtype="float32", mesh=mesh)
    toks = adsa_jax.generate(m, labels, jax.random.key(3), sampling=sampling, mesh=mesh)
    np.save(f"tp_api.p{pid}.npy", to_host(toks))
    with open("writes.json", "w") as f:  # this file itself is the last write recorded
        json.dump(sorted(set(writes)), f)


if __name__ == "__main__":
    main(*sys.argv[1:])
