"""benchmarks/llamagen_torch.py: its argument checks (each one line, before any work) and, where a
LlamaGen checkout is at third_party/LlamaGen (ignored by git, so not in CI), a tiny eager run."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fixture_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "llamagen_torch.py"
CHECKOUT = ROOT / "third_party" / "LlamaGen"

_spec = importlib.util.spec_from_file_location("llamagen_torch", SCRIPT)
lt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lt)


def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("llamagen_torch.py: error:") and err.count("\n") == 1, err
    return err


def test_missing_checkout_one_line(tmp_path, capsys):
    assert lt.main([]) == 2
    assert "--llamagen DIR is required" in _err(capsys)
    assert lt.main(["--llamagen", str(tmp_path / "nope")]) == 2
    assert "no such directory" in (e := _err(capsys)) and "git clone https://github.com/FoundationVision/LlamaGen" in e
    assert lt.main(["--llamagen", str(tmp_path)]) == 2  # a directory, but not a checkout
    err = _err(capsys)
    assert "not a LlamaGen checkout" in err and "autoregressive/models/gpt.py" in err


@pytest.mark.parametrize("args,msg", [
    (["--configs", "GPT-XL:256"], "is not MODEL:IMAGE_SIZE:BATCH"),
    (["--configs", "GPT-XL:big:4"], "is not MODEL:IMAGE_SIZE:BATCH"),
    (["--modes", "eager,jit"], "not among eager, compile"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--date", "3 Dec"], "is not YYYY-MM-DD"),
])
def test_bad_arguments_one_line(tmp_path, capsys, args, msg):
    assert lt.main(["--llamagen", str(tmp_path)] + args) == 2
    assert msg in _err(capsys)


def test_without_torch_one_line(tmp_path):
    """With PyTorch not importable, one line says so (a child process, where torch is blocked)."""
    code = ("import sys, importlib.util; sys.modules['torch'] = None; "
            f"spec = importlib.util.spec_from_file_location('lt', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"sys.exit(m.main(['--llamagen', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("llamagen_torch.py: error: PyTorch is not installed") and r.stderr.count("\n") == 1


@pytest.mark.skipif(not (CHECKOUT / "autoregressive" / "models" / "generate.py").is_file(),
                    reason="no LlamaGen checkout at third_party/LlamaGen (see benchmarks/llamagen_torch.py)")
def test_tiny_eager_run_rows(tmp_path, capsys):
    """LlamaGen's own generate on a tiny config (fixture sizes, 4x4 tokens): one row per configuration
    in the results.json schema, which make_tables accepts; a bad model name fails before any timing."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(fixture_config("gpt_c2i_small")))
    out = tmp_path / "rows.json"
    assert lt.main(["--llamagen", str(CHECKOUT), "--configs", f"{cfg}:64:2", "--modes", "eager", "--iters", "1",
                    "--warmup", "0", "--dtype", "float32", "--device", "cpu", "--date", "2026-12-03",
                    "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["framework"], row["model"], row["image_size"], row["batch"], row["policy"], row["date"]) == (
        "torch-eager", "tiny", 64, 2, "dense", "2026-12-03")
    assert row["img_per_s"] == pytest.approx(2 / row["s_per_call"], rel=0.01) and row["peak_gib"] is None
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    assert mt.check_rows([row]) == [row]
    capsys.readouterr()
    assert lt.main(["--llamagen", str(CHECKOUT), "--configs", "GPT-Q:256:1", "--device", "cpu"]) == 2
    assert "unknown model 'GPT-Q'" in _err(capsys)
