"""Shared fixtures: the original PyTorch LlamaGen outputs in tests/data/ (its README says what each file holds)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "data"

# The suite compiles hundreds of programs for tiny models on a 2-core CI machine, where LLVM's
# optimisation of the CPU code costs more than it saves: at level 1 the suite takes 15% less CPU
# time and every test passes as at the default level (level 0 changes float results: a near-tie greedy
# token of t2i flips). Set before JAX starts its backend; the child processes the tests launch
# append their own flags to it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()


def pytest_configure(config):
    """An xdist worker stores the programs it compiles in a persistent compilation cache that the
    run's workers share: many programs (the fixture models' generate and score programs, used by
    several modules) would otherwise be compiled by both workers. Set before the first compile
    (JAX decides once whether to use the cache); a fresh directory for every run, next to the
    workers' temporary directories; programs that compile in under a second are not stored. A
    size limit turns on the cache's file lock, so a worker never reads an entry the other is
    still writing."""
    if not hasattr(config, "workerinput") or not config.option.basetemp:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(config.option.basetemp).parent / "jax_cache"))
    jax.config.update("jax_compilation_cache_max_size", 2**32)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def fixture_config(name):
    return json.loads((FIXTURES / "configs.json").read_text())[name]


# Package scope: tests/ is one directory (no __init__.py), so these are built once per pytest process.
@pytest.fixture(scope="package")
def fixtures_dir():
    assert FIXTURES.is_dir(), f"reference fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="package")
def config_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    out = {}
    for name in ("gpt_c2i_small", "gpt_t2i_small"):
        p = d / f"{name}.json"
        p.write_text(json.dumps(fixture_config(name)))
        out[name] = p
    return out


@pytest.fixture(scope="package")
def c2i_dir(tmp_path_factory, config_files):
    """The c2i fixture converted through the CLI, as a user would."""
    from adsa_jax.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "c2i"
    assert main(["convert", "gpt", str(FIXTURES / "gpt_c2i_small.pt"), "--model",
                 str(config_files["gpt_c2i_small"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="package")
def t2i_dir(tmp_path_factory, config_files):
    from adsa_jax.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "t2i"
    assert main(["convert", "gpt", str(FIXTURES / "gpt_t2i_small.pt"), "--type", "t2i", "--model",
                 str(config_files["gpt_t2i_small"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="package")
def c2i(c2i_dir):
    import adsa_jax

    return adsa_jax.load(c2i_dir, dtype="float32")


@pytest.fixture(scope="package")
def t2i(t2i_dir):
    import adsa_jax

    return adsa_jax.load(t2i_dir, dtype="float32")


@pytest.fixture(scope="package")
def c2i_ref():
    return dict(np.load(FIXTURES / "gpt_c2i_small_ref.npz"))


@pytest.fixture(scope="package")
def t2i_ref():
    return dict(np.load(FIXTURES / "gpt_t2i_small_ref.npz"))


# The Pallas-interpreter matrix runs the GPU kernels inside whole generations on the CPU: each case
# costs 10-40 s of CPU. CI runs them all, within its 10 minutes; they are marked so that a quick
# local run can leave them out (python -m pytest -m 'not slow').
SLOW_CASES = {
    "test_kernel_in_generation_matches_xla[dense-kw1-True-False]",
    "test_kernel_in_generation_matches_xla[window-kw3-True-False]",
    "test_kernel_in_generation_matches_xla[adsa-evict-kw4-False-True]",
    "test_kernel_in_generation_matches_xla[window-kw5-False-False]",
    "test_kernel_in_generation_matches_xla[adsa-evict-kw7-False-False]",
    "test_kernel_in_generation_matches_xla[adsa-evict-kw8-True-False]",
    "test_rope_before_the_kernel_matches_xla[dense-kw0]",
    "test_rope_before_the_kernel_matches_xla[window-kw2]",
    "test_kernel_with_caption_masks",
    "test_small_row_gemms_in_generation[dense-kw0-xla-True]",
    "test_small_row_gemms_in_generation[adsa-evict-kw2-pallas-interpret-True]",
    "test_kernel_in_generation_matches_xla[adsa-select-kw6-False-False]",
    "test_kernel_in_generation_matches_xla[adsa-evict-all-kw9-True-False]",
    "test_kernel_small_blocks_match_xla[adsa-evict]",
    "test_kernel_in_generation_matches_xla[adsa-evict-kw10-True-False]",
    "test_kernel_in_generation_matches_xla[adsa-evict-kw11-True-False]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
