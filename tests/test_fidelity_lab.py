"""The fidelity lab's whole pipeline (fetch, tokenize, train, evaluate, report) on synthetic stand-in
tarballs, on the CPU: the report's schema, and dense's excess NLL exactly 0 (it is its own reference)."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

LAB = Path(__file__).resolve().parents[1] / "examples" / "fidelity" / "lab.py"
ROW_KEYS = {"policy", "granularity", "budget", "excess_nll", "excess_nll_se", "seed_spread", "kl", "top1",
            "class_acc", "feature_fd", "mirror_acc", "kv_bytes_per_image"}


def _lab_module(name):
    """One of the lab's modules (lab, train, report), which import each other from their directory."""
    if str(LAB.parent) not in sys.path:
        sys.path.insert(0, str(LAB.parent))
    return importlib.import_module(name)


def _lab(capsys, *args):
    """lab.py's main in this process, as its command line runs it: (exit code, stderr). The stages
    the checks below run fail before any compile or are small; a process each would cost more
    than they do (Python and JAX start-up)."""
    capsys.readouterr()
    code = _lab_module("lab").main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_smoke_pipeline(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(LAB), "smoke", "--work", str(tmp_path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert {"dataset", "grid", "model", "seeds", "rows"} <= set(s)
    assert s["grid"] == [16, 16] and s["seeds"] == [0, 1]
    assert set(s["model"]) >= {"layers", "width", "params"} and s["model"]["layers"] == 2
    assert {r["policy"] for r in s["rows"]} == {"dense", "adsa-evict", "window", "random"}
    for row in s["rows"]:
        assert ROW_KEYS <= set(row), row
        assert all(row[k] is not None for k in ROW_KEYS - {"granularity", "budget"})
    dense = next(r for r in s["rows"] if r["policy"] == "dense")
    assert dense["excess_nll"] == 0.0 and dense["kl"] == 0.0 and dense["top1"] == 1.0
    sparse = [r for r in s["rows"] if r["policy"] != "dense"]
    # a half-size cache stores fewer bytes than dense, exactly the slots' share
    assert all(r["kv_bytes_per_image"] < dense["kv_bytes_per_image"] for r in sparse)
    # the table names a verdict for the one budget, and ADSA's standing against each baseline
    table = (tmp_path / "results" / "table.md").read_text()
    assert "Budget 0.50: **" in table and "Budget 0.50, adsa-evict (head) is" in table
    assert {c["against"] for c in s["head_to_head"]["0.5"]} == {"window|None|0.5|", "random|None|0.5|"}
    # the policies are compared on the held-out optimum that training kept
    assert s["training"]["evaluated_step"] == s["training"]["best_step"] is not None
    _check_export(tmp_path, capsys)
    _check_damaged_run_files(tmp_path, capsys)


def _check_export(work, capsys):
    """`export`: one seed's held-out optimum, bf16, loadable by adsa_jax.load, with the tokenizer."""
    import jax
    import numpy as np

    import adsa_jax

    def export(*args):
        return _lab(capsys, "export", "--data-dir", work / "data", "--run", work / "run", *args)

    out = work / "exported"
    code, err = export("--out", str(out), "--seed-index", "1")
    assert code == 0, err[-3000:]
    model = adsa_jax.load(out, dtype=None)
    _, params, meta = _lab_module("train").load_trained(work / "run")
    want = jax.tree.map(lambda x: np.asarray(x[1].astype(jax.numpy.bfloat16)), params)
    got = jax.tree.map(np.asarray, model.params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert np.array_equal(np.load(out / "tokenizer.npz")["codebook"], np.load(work / "data" / "tokenizer.npz")["codebook"])
    for args, msg in (([ "--out", str(out)], "exported"), (["--out", str(work / "other"), "--seed-index", "2"],
                                                          "--seed-index 2 is out of range")):
        code, err = export(*args)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err[-2000:]


def _check_damaged_run_files(work, capsys):
    """A run's JSON files are read as untrusted: a damaged one is named in one line, before any
    compile (evaluate) or plot (report), and nothing is written over it."""
    run = work / "run"

    def lab(*args):
        return _lab(capsys, *args, "--data-dir", work / "data", "--run", run)

    (run / "eval.json").write_text('{"rows": {"dense|None|None|"')  # cut short
    for args in (["evaluate"], ["report", "--out", str(work / "report2")]):
        code, err = lab(*args)
        assert code == 2 and "eval.json cannot be read as JSON" in err and len(err.strip().splitlines()) == 1, err
    assert (run / "eval.json").read_text() == '{"rows": {"dense|None|None|"'
    (run / "model.json").write_text("[1, 2]")
    code, err = lab("evaluate")
    assert code == 2 and "model.json is not what the lab writes" in err, err
    # `judge` trains the classifier once into the data directory, where evaluate finds it
    cls = work / "data" / "classifier.npz"
    assert not cls.exists()
    code, err = lab("judge", "--classifier-steps", "3")
    assert code == 0 and cls.is_file() and "judge: held-out accuracy" in err, err[-2000:]
    code, err = lab("judge")
    assert code == 0 and "exists" in err


def test_fetch_without_tarballs_says_how(tmp_path, capsys):
    code, err = _lab(capsys, "tokenize", "--data-dir", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "emoji-datasource-16.0.0.tgz is missing" in err and "by hand" in err


def test_convergence_uses_a_longer_schedule():
    """A cosine schedule still falls at its end; a longer run of the same seeds that overfit and never
    got 1 % lower shows the shorter run is at the optimum. Without it, or when it got lower, it is not."""
    report = _lab_module("report")
    log = {"eval": [{"step": s, "heldout_nll": [v, v + 0.01]} for s, v in ((250, 1.2), (500, 0.85), (750, 0.70),
                                                                          (1000, 0.66))]}
    alone = report.convergence(log)
    assert not alone["flattened"] and abs(alone["relative_fall"][0] - (0.70 - 0.66) / 0.70) < 1e-12
    longer = {"best_step": 1000, "best_heldout_nll": [0.67, 0.68], "overfit": True}
    assert report.convergence(log, longer)["flattened"]
    assert not report.convergence(log, {**longer, "overfit": False})["flattened"]  # still improving: unknown
    lower = report.convergence(log, {**longer, "best_heldout_nll": [0.64, 0.68]})  # 3 % lower on seed 0
    assert not lower["flattened"] and lower["longer_gain"][0] > 0.01
    try:
        report.convergence(log, {**longer, "best_heldout_nll": [0.67]})
    except report.lab_data.DataError as e:
        assert "same seeds" in str(e)
    else:
        raise AssertionError("a longer run with other seeds was accepted")
