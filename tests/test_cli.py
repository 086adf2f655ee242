"""The adsa-jax command line, end to end on the fixture models."""
import json

import jax
import numpy as np
import pytest

import adsa_jax
from adsa_jax.cli import main


def test_sample_tokens_match_python_api(c2i_dir, c2i, tmp_path):
    out = tmp_path / "tokens.npy"
    assert main(["sample", "--gpt", str(c2i_dir), "--classes", "7,3", "--seed", "0", "--dtype", "float32",
                 "--top-k", "100", "--tokens-out", str(out)]) == 0
    toks = np.load(out)
    assert toks.shape == (2, 64) and toks.dtype == np.int32
    ref = adsa_jax.generate(c2i, np.array([7, 3]), jax.random.key(0), sampling=adsa_jax.SamplingConfig(top_k=100))
    np.testing.assert_array_equal(toks, np.asarray(ref))


def test_sample_policy_and_batches(c2i_dir, tmp_path):
    out = tmp_path / "t.npy"
    assert main(["sample", "--gpt", str(c2i_dir), "--num-samples", "5", "--batch-size", "2", "--policy", "adsa-evict",
                 "--prefix", "2", "--keep", "6", "--local", "9", "--tokens-out", str(out)]) == 0
    assert np.load(out).shape == (5, 64)


def test_sample_errors(c2i_dir, tmp_path, capsys):
    assert main(["sample", "--gpt", str(c2i_dir), "--classes", "3,12"]) == 2
    assert "outside [0, 9]" in capsys.readouterr().err
    assert main(["sample", "--gpt", str(c2i_dir), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["sample", "--gpt", str(tmp_path / "missing")]) == 2
    assert "not an adsa_jax checkpoint" in capsys.readouterr().err
    assert main(["sample", "--gpt", str(c2i_dir), "--policy", "adsa-evict", "--budget", "0.1"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["sample", "--gpt", str(c2i_dir), "--policy", "window", "--period", "2"]) == 2
    assert "period applies to adsa-evict" in capsys.readouterr().err
    assert main(["sample", "--gpt", str(c2i_dir), "--tokens-out", str(tmp_path / "no" / "dir" / "t.npy")]) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["plan", "compare", "eval-demo", "sample"])
def test_output_paths_are_checked_before_any_work(cmd, c2i_dir, tmp_path, capsys):
    """An output file in a missing folder, or a folder where a file goes, fails at once in one line
    naming the flag (it used to fail after the work, or with a traceback), and nothing is written."""
    base = {"plan": ["plan", "--model", "GPT-B", "--batch", "1"], "compare": ["compare", "--gpt", str(c2i_dir)],
            "eval-demo": ["eval-demo"], "sample": ["sample", "--gpt", str(c2i_dir)]}[cmd]
    flag = "--tokens-out" if cmd == "sample" else "--json"
    (tmp_path / "here").mkdir()
    for path, msg in ((tmp_path / "here", "it is a directory; give a file name"),
                      (tmp_path / "missing" / "x.json", f"{tmp_path / 'missing'} does not exist")):
        assert main([*base, flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"adsa-jax {cmd}: error: cannot write {flag} {path}: {msg}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["here"] and not any((tmp_path / "here").iterdir())


def test_compare_table_and_json(c2i_dir, tmp_path, capsys):
    js = tmp_path / "cmp.json"
    assert main(["compare", "--gpt", str(c2i_dir), "--classes", "1,2", "--policies", "dense,adsa-evict",
                 "--budgets", "0.5,1.0", "--json", str(js)]) == 0
    table = capsys.readouterr().out
    assert "adsa-evict" in table and "KL mean" in table
    rows = json.loads(js.read_text())
    by = {(r["policy"], r["budget"]): r for r in rows}
    assert by[("dense", None)]["kl_mean"] == 0 and by[("dense", None)]["kv_vs_dense"] == 1
    full = by[("adsa-evict", 1.0)]
    assert full["kl_mean"] < 1e-6 and full["top1_agreement"] == 1.0
    half = by[("adsa-evict", 0.5)]
    # c + P + K + M = 1 + 32 slots of the dense 1 + 63
    assert abs(half["kv_vs_dense"] - 33 / 64) < 1e-9 and half["kl_mean"] > 0


def test_sweep_axes_refuse_a_value_twice(capsys, tmp_path):
    """compare's and eval-demo's policies, budgets and seeds: a value given twice is refused in one
    line before any checkpoint is read (a seed twice would be counted twice in eval-demo's means)."""
    missing = str(tmp_path / "no_checkpoint")
    for args, msg in ((["compare", "--gpt", missing, "--policies", "window,dense,window"], "--policies lists 'window'"),
                      (["compare", "--gpt", missing, "--budgets", "0.5,0.25,0.5"], "--budgets lists 0.5"),
                      (["eval-demo", "--seeds", "0,1,0"], "--seeds lists 0 more than once: give each value once")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_python_m_convert_entry_point(fixtures_dir, config_files, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--model",
                        str(config_files["gpt_c2i_small"]), "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert adsa_jax.load(tmp_path / "m").config.dim == 192


def _flags(parser, path=()):
    """(command path, action) of every flag and positional of every (sub)command."""
    import argparse

    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sub in act.choices.items():
                yield from _flags(sub, path + (name,))
        elif not isinstance(act, argparse._HelpAction):
            yield path, act


def test_every_flag_documents_its_default():
    """--help of every command: each flag has help text, and each one that takes a value says its
    default (or that it is required); %(default)s expands to the value argparse really uses."""
    import argparse

    from adsa_jax.cli import build_parser

    seen = set()
    for path, act in _flags(build_parser()):
        seen.add(path)
        where = f"{' '.join(path)} {act.option_strings or act.dest}"
        assert act.help, f"{where} has no help"
        if act.option_strings and not isinstance(act, argparse._StoreTrueAction):
            assert "default" in act.help or "required" in act.help, f"{where}: help names no default"
        if "%(default)s" in act.help:
            assert act.default is not None, f"{where}: %(default)s of None"
    assert {("convert", "gpt"), ("convert", "vq"), ("sample",), ("merge",), ("compare",), ("bench",),
            ("eval-demo",)} <= seen


def test_classes_help_names_the_real_defaults(capsys):
    """sample --help: --classes names LlamaGen's labels for ImageNet models, the first 8 classes of
    smaller label sets, and the demo model's 4 per digit (what run_sample really does)."""
    import pytest

    from adsa_jax.cli.common import DEMO_CLASSES, default_classes

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert DEMO_CLASSES in text and "first 8 classes" in text and "4 per digit" in text
    assert default_classes(1000) == DEMO_CLASSES and default_classes(10) == "0,1,2,3,4,5,6,7"
