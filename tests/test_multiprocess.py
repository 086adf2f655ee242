"""Two processes of two fake CPU devices each (jax.distributed with a coordinator on 127.0.0.1,
gloo collectives), against one process on one device, same seed and settings, float32 (and bf16
with --batch-invariant):

- ``sample --npz`` with parts from both hosts, killed mid-run (SIGKILL) and restarted;
- ``--tokens-out``, the PNG grid (``--out``) and ``--out-dir``, which only process 0 writes;
- the Python API, ``generate`` on a mesh spanning both processes, gathered with ``to_host``;
- a 2 x 2 (data x model) mesh across the processes: tensor parallelism through the CLI and the API.

The processes run tests/multiprocess_worker.py; the module launches them twice (the killed run,
then the resumed run that also does everything else) and every test reads the outcome.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multiprocess_worker as W  # noqa: E402
from xdist_once import run_once  # noqa: E402

WORKER = HERE / "multiprocess_worker.py"
TIMEOUT = 240  # seconds per launch; a launch takes about 15-30 s on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pair:
    """Two worker processes; any failure names the process, its exit code and its stderr."""

    def __init__(self, phase, root: Path, dirs):
        self.root = root
        port = _free_port()
        env = dict(os.environ, JAX_PLATFORMS="cpu",  # the run's XLA_FLAGS (conftest) and the device count
                   XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
        self.logs = [root / f"{phase}.p{i}.stderr" for i in range(2)]
        self.procs = []
        for i in range(2):
            own = root / f"p{i}"
            own.mkdir(exist_ok=True)
            with open(self.logs[i], "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), phase, str(i), str(port), str(root / "shared"), str(own),
                     *map(str, dirs)], env=env, stdout=subprocess.DEVNULL, stderr=err))

    def tail(self, i, n=3000):
        return self.logs[i].read_text()[-n:]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=30)

    def wait(self, timeout=TIMEOUT):
        """Both exit 0, or a failure naming which one died (the other is then stopped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in self.procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                self.kill()
                i = bad[0]
                pytest.fail(f"process {i} of 2 died with exit code {codes[i]}; the other was stopped. "
                            f"stderr of process {i}:\n{self.tail(i)}\n--- stderr of process {1 - i}:\n"
                            f"{self.tail(1 - i, 1500)}")
            if all(c == 0 for c in codes):
                return
            time.sleep(0.1)
        running = [i for i, p in enumerate(self.procs) if p.poll() is None]
        self.kill()
        pytest.fail(f"process(es) {running} still running after {timeout} s (killed); stderr of process "
                    f"{running[0]}:\n{self.tail(running[0])}")


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    from adsa_jax.cli import main

    out = tmp_path_factory.mktemp("vq") / "vq"
    assert main(["convert", "vq", str(HERE / "data" / "vq_small.pt"), "--ch", "32", "--z-channels", "32",
                 "--codebook-size", "512", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tp_dir(tmp_path_factory):
    """A random model whose 4 heads and FFN split over a model axis of 2."""
    import jax
    import jax.numpy as jnp

    from adsa_jax.checkpoint import save_gpt
    from adsa_jax.config import GPTConfig
    from adsa_jax.model import init_params

    cfg = GPTConfig(**W.TP_CFG)
    out = tmp_path_factory.mktemp("tp") / "tp"
    save_gpt(out, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0), jnp.float32, std=0.3)), cfg)
    return out


@pytest.fixture(scope="module")
def run(c2i_dir, vq_dir, tp_dir, tmp_path_factory):
    """The two launches, once however many xdist workers run this module's tests."""
    res = run_once(tmp_path_factory, "multiprocess", lambda: _launch(c2i_dir, vq_dir, tp_dir, tmp_path_factory))
    return {**res, "root": Path(res["root"]), "ref": Path(res["ref"])}


def _launch(c2i_dir, vq_dir, tp_dir, tmp_path_factory):
    from adsa_jax.cli import main

    root = tmp_path_factory.mktemp("multiprocess")
    dirs = (c2i_dir, vq_dir, tp_dir)
    parts = root / "shared" / "run.parts"
    t0 = time.monotonic()

    # 1. The --npz run, killed (both processes, SIGKILL) once both hosts have written a part.
    first = Pair("npz", root, dirs)
    deadline = time.monotonic() + TIMEOUT
    while not all((parts / f"part-00000.p00{i}.npz").is_file() for i in range(2)):
        if any(p.poll() is not None for p in first.procs) or time.monotonic() > deadline:
            first.kill()
            pytest.fail(f"the first run ended before it could be killed; stderr of process 0:\n{first.tail(0)}\n"
                        f"--- process 1:\n{first.tail(1)}")
        time.sleep(0.01)
    first.procs[1].send_signal(signal.SIGKILL)  # one host dies mid-run ...
    first.kill()  # ... and the other is stopped, as a scheduler would
    killed = sorted(p.name for p in parts.glob("part-*.npz"))
    print(f"killed after {time.monotonic() - t0:.1f} s", file=sys.stderr)
    merged_early = (root / "shared" / "run.npz").exists()

    # 2. Both restarted: the --npz run resumes, then every other output mode.
    second = Pair("all", root, dirs)
    # Meanwhile, the same commands in this process, on one device.
    ref = root / "ref"
    ref.mkdir()
    gpt = ["--gpt", str(c2i_dir), "--vq", str(vq_dir), *W.SAMPLE]
    assert main(["sample", "--gpt", str(c2i_dir), *W.SAMPLE, *W.NPZ_RUN, "--npz", str(ref / "run.npz")]) == 0
    assert main(["sample", *gpt, *W.IMAGES_RUN, "--tokens-out", str(ref / "tokens.npy"), "--out", str(ref / "grid.png"),
                 "--out-dir", str(ref / "pngs")]) == 0
    assert main(["sample", "--gpt", str(tp_dir), *W.SAMPLE, *W.TP_RUN, "--tokens-out", str(ref / "tp_tokens.npy")]) == 0
    assert main(["sample", "--gpt", str(c2i_dir), *W.BF16_RUN, "--tokens-out", str(ref / "bf16_tokens.npy")]) == 0
    print(f"references done after {time.monotonic() - t0:.1f} s", file=sys.stderr)
    second.wait()
    print(f"second pair done after {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return {"root": str(root), "ref": str(ref), "killed": killed, "merged_early": merged_early,
            "resumed_log": second.logs[0].read_text(), "seconds": time.monotonic() - t0}


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def test_tokens_out_equals_one_process(run):
    got = np.load(run["root"] / "p0" / "tokens.npy")
    assert got.shape == (8, 64) and got.dtype == np.int32
    np.testing.assert_array_equal(got, np.load(run["ref"] / "tokens.npy"))


def test_bf16_batch_invariant_tokens_equal_one_process(run):
    """bf16 with --batch-invariant: 2 processes x 2 devices (one image per device per batch, padded to
    a group of 2) give exactly the tokens of one process on one device (two groups per batch)."""
    got = np.load(run["root"] / "p0" / "bf16_tokens.npy")
    assert got.shape == (8, 64)
    np.testing.assert_array_equal(got, np.load(run["ref"] / "bf16_tokens.npy"))


def test_png_grid_and_out_dir_equal_one_process(run):
    np.testing.assert_array_equal(_png(run["root"] / "p0" / "grid.png"), _png(run["ref"] / "grid.png"))
    names = sorted(p.name for p in (run["ref"] / "pngs").iterdir())
    assert names == [f"{i:06d}.png" for i in range(8)]
    assert sorted(p.name for p in (run["root"] / "p0" / "pngs").iterdir()) == names
    for n in names:
        np.testing.assert_array_equal(_png(run["root"] / "p0" / "pngs" / n), _png(run["ref"] / "pngs" / n))


def test_only_process_0_writes_and_no_path_twice(run):
    own1 = run["root"] / "p1"
    assert sorted(p.name for p in own1.iterdir()) == ["api.p1.npy", "tp_api.p1.npy", "writes.json"]
    w0, w1 = (set(json.loads((run["root"] / f"p{i}" / "writes.json").read_text())) for i in range(2))
    assert not w0 & w1, f"both processes wrote {sorted(w0 & w1)}"
    shared = [Path(p).name for p in w1 if p.startswith(str(run["root"] / "shared"))]
    assert shared and all(".p001." in n for n in shared), sorted(w1)  # its own parts only
    assert str(run["root"] / "shared" / "run.npz") in w0  # the merge


def test_npz_killed_mid_run_resumes_to_the_one_process_output(run):
    assert not run["merged_early"] and 2 <= len(run["killed"]) < 12, run["killed"]  # 6 batches x 2 hosts
    assert "images already there" in run["resumed_log"]
    n_done = int(run["resumed_log"].split("images already there")[0].rsplit(";", 1)[1].split()[0])
    assert 4 <= n_done < 24, run["resumed_log"][-2000:]
    parts = sorted(p.name for p in (run["root"] / "shared" / "run.parts").glob("part-*.npz"))
    assert parts == sorted(f"part-{k:05d}.p00{i}.npz" for k in range(6) for i in range(2))
    got, want = np.load(run["root"] / "shared" / "run.npz"), np.load(run["ref"] / "run.npz")
    assert got["arr_0"].shape == (24, 64) and got["arr_0"].dtype == np.int32  # tokens (no --vq)
    np.testing.assert_array_equal(got["arr_0"], want["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    np.testing.assert_array_equal(got["arr_0"][:8], np.load(run["ref"] / "tokens.npy"))  # image i's key: i alone


def test_python_api_gathered_on_both_processes(run):
    want = np.load(run["ref"] / "tokens.npy")[:4]
    for i in range(2):
        np.testing.assert_array_equal(np.load(run["root"] / f"p{i}" / f"api.p{i}.npy"), want, err_msg=f"process {i}")


def test_tensor_parallel_2x2_across_processes(run):
    want = np.load(run["ref"] / "tp_tokens.npy")
    assert want.shape == (4, 36)
    np.testing.assert_array_equal(np.load(run["root"] / "p0" / "tp_tokens.npy"), want)  # the CLI
    for i in range(2):  # the API
        np.testing.assert_array_equal(np.load(run["root"] / f"p{i}" / f"tp_api.p{i}.npy"), want, err_msg=f"process {i}")
