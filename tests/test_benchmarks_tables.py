"""BENCHMARKS.md is what benchmarks/make_tables.py writes from benchmarks/results.json (no JAX)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
mt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mt)


@pytest.fixture(scope="module")
def rows():
    return mt.load_rows(ROOT / "benchmarks" / "results.json")


def test_results_rows_have_the_schema(rows):
    assert rows, "results.json holds no rows"
    for row in rows:
        assert set(mt.REQUIRED) <= set(row) <= set(mt.REQUIRED) | set(mt.OPTIONAL)
        assert row["framework"] in ("adsa_jax", "torch-eager", "torch-compile")
    # the file is written one row per line, as --add writes it
    assert (ROOT / "benchmarks" / "results.json").read_text() == mt.dump_rows(rows)


def test_benchmarks_md_is_generated_from_results(rows):
    doc = (ROOT / "BENCHMARKS.md").read_text()
    assert doc == mt.render(doc, rows), "BENCHMARKS.md is stale: run python benchmarks/make_tables.py"
    assert {m.group(2) for m in mt.BLOCK.finditer(doc)} == set(mt.TABLES)  # every table is shown
    assert len(doc.splitlines()) <= 200


def _row(**kw):
    r = {"device": mt.H200, "date": "2026-12-02", "framework": "adsa_jax", "model": "GPT-XL", "image_size": 384,
         "batch": 256, "policy": "dense", "budget": None, "granularity": None, "img_per_s": 50.0,
         "s_per_image": 0.02, "peak_gib": 50.0, "memory_cap_gib": None}
    r.update(kw)
    return r


def test_no_ratio_across_days():
    dense = _row()
    same = _row(policy="adsa-evict", budget=0.5, granularity="head", peak_gib=25.0)
    other = _row(policy="window", budget=0.5, peak_gib=25.0, date="2026-12-01")
    lines = mt.t_memory([dense, same, other])
    xl384 = next(line for line in lines if line.startswith("| GPT-XL | 384 |"))
    assert "25.00 (0.50x)" in xl384  # adsa-evict: the same day as dense
    assert "25.00* |" in xl384 and "25.00* (" not in xl384  # window: another day, so no ratio, and a date mark
    assert "* measured 2026-12-01" in lines[-1]
    targets = "\n".join(mt.t_targets([dense, same, _row(batch=64), _row(batch=64, policy="adsa-evict", budget=0.5,
                                                                           granularity="head", date="2026-12-01")]))
    assert "batch 64: measured on different days" in targets


def test_bad_rows_are_named():
    with pytest.raises(mt.TableError, match="row 0: missing keys \\['peak_gib'\\]"):
        mt.check_rows([{k: v for k, v in _row().items() if k != "peak_gib"}])
    with pytest.raises(mt.TableError, match="framework 'jax'"):
        mt.check_rows([_row(framework="jax")])
    with pytest.raises(mt.TableError, match="inverse"):
        mt.check_rows([_row(s_per_image=1.0)])
    with pytest.raises(mt.TableError, match="rows 0 and 1 measure the same configuration"):
        mt.check_rows([_row(), _row(date="2026-12-01")])


def test_add_bench_rows_replaces_the_same_configuration():
    bench = {"device": {"device": mt.H200}, "jax": "0.11.2", "rows": [
        {"name": "GPT-XL", "image_size": 384, "batch": 256, "policy": "dense", "budget": None, "dtype": "bfloat16",
         "cfg": True, "s_per_call": 4.0, "peak_bytes_compiled": 40 * 2**30, "floor_s": 3.0},
        {"name": "GPT-XL", "image_size": 384, "batch": 256, "policy": "window", "budget": 0.5, "error": "OOM"}]}
    new = mt.rows_from_bench(bench, date="2026-12-05")
    assert len(new) == 1 and new[0]["img_per_s"] == 64.0 and new[0]["peak_gib"] == 40.0
    merged = mt.merge([_row(), _row(batch=64)], new)
    assert [(r["batch"], r["date"]) for r in merged] == [(64, "2026-12-02"), (256, "2026-12-05")]
    json.loads(mt.dump_rows(merged))
    with pytest.raises(mt.TableError, match="--device"):
        mt.rows_from_bench({"device": None, "rows": []})
    # an eviction period s > 1 is its own configuration, beside period 1; period 1 is not written
    ev = {"name": "GPT-XL", "image_size": 384, "batch": 64, "policy": "adsa-evict", "budget": 0.5, "dtype": "bfloat16",
          "cfg": True, "s_per_call": 2.0, "granularity": "head"}
    s1, s8 = mt.rows_from_bench({"device": {"device": mt.H200}, "rows": [dict(ev, period=1), dict(ev, period=8)]},
                                date="2026-12-05")
    assert "period" not in s1 and s8["period"] == 8 and mt.identity(s1) != mt.identity(s8)
    assert len(mt.merge([s1], [s8])) == 2 and mt.check_rows([s1, s8])
    assert mt.find([s1, s8], image_size=384, policy="adsa-evict", budget=0.5, period=8) is s8
    # so is a --batch-invariant row (its group size): it never replaces the plain row
    (inv,) = mt.rows_from_bench({"device": {"device": mt.H200}, "rows": [dict(ev, batch_invariant=32)]}, date="2026-12-05")
    assert inv["invariant_group"] == 32 and len(mt.merge([s1], [inv])) == 2 and mt.check_rows([s1, inv])
    assert mt.find([inv, s1], image_size=384, policy="adsa-evict", budget=0.5) is s1


def test_floor_table_shows_the_kernel_floor_where_a_bench_recorded_it():
    bench = {"device": {"device": mt.H200}, "rows": [
        {"name": "GPT-XL", "image_size": 384, "batch": 256, "policy": "dense", "budget": None, "dtype": "bfloat16",
         "cfg": True, "s_per_call": 6.0, "floor_s": 4.0, "floor_kernel_s": 5.0}]}
    (new,) = mt.rows_from_bench(bench, date="2026-12-05")
    assert new["floor_kernel_s"] == 5.0 and mt.check_rows([new])
    old = _row(batch=64, s_per_call=3.0, s_per_image=3.0 / 64, img_per_s=64 / 3.0, floor_s=2.0)  # before the field
    lines = mt.t_floor([new, old])
    assert next(x for x in lines if x.startswith("| GPT-XL | 384 | 256 |")).split(" | ")[3] == "1.50x (k 1.20x)"
    assert next(x for x in lines if x.startswith("| GPT-XL | 384 | 64 |")).split(" | ")[3] == "1.50x*"
    # issue 25's verdict stays on the call's floor; the kernel floor is shown once every row has it
    grid = [_row(batch=b, policy=p, budget=bu, granularity="head" if p == "adsa-evict" else None, date="2026-12-05",
                 s_per_call=2.0 * k, s_per_image=2.0 * k / b, img_per_s=b / (2.0 * k), floor_s=1.0 * k,
                 floor_kernel_s=1.6 * k) for b in (64, 256) for k, (p, bu) in enumerate(mt.POLICIES, 1)]
    line = next(x for x in mt.t_targets(grid) if "within 1.3x of its floor" in x)
    assert "worst 2.00x (dense, batch 64); over the kernel floor, worst 1.25x | **missed**" in line
    line = next(x for x in mt.t_targets(grid[:-1] + [{k: v for k, v in grid[-1].items() if k != "floor_kernel_s"}]) if "1.3x of its" in x)
    assert "kernel floor" not in line


def test_torch_ratio_only_on_one_device_and_day():
    ours = _row(image_size=256, batch=64, img_per_s=120.0, s_per_image=1 / 120)
    tc = _row(framework="torch-compile", image_size=256, batch=64, img_per_s=60.0, s_per_image=1 / 60)
    te = _row(framework="torch-eager", image_size=256, batch=64, img_per_s=6.0, s_per_image=1 / 6, date="2026-12-01")
    line = next(x for x in mt.t_torch([ours, tc, te]) if x.startswith("| GPT-XL | 256 | 64 |"))
    assert line.endswith("| 120.0 | other day | 2.00x |")
    assert "2.00x at 256 px batch 64 | reported" in "\n".join(mt.t_targets([ours, tc]))


def test_torch_rows_without_adsa_jax_that_day_are_left_out():
    tc = _row(framework="torch-compile", image_size=256, batch=64, img_per_s=60.0, s_per_image=1 / 60)
    other = _row(image_size=256, batch=64, img_per_s=120.0, s_per_image=1 / 120, date="2026-12-01")
    assert not [x for x in mt.t_torch([tc, other]) if x.startswith("| GPT-XL |")]
    assert [x for x in mt.t_torch([tc, dict(other, date=tc["date"])]) if x.startswith("| GPT-XL | 256 | 64 |")]


def test_a_replaced_row_stays_as_an_anchor_while_a_same_day_comparison_needs_it():
    day1 = _row(image_size=256, batch=64, img_per_s=120.0, s_per_image=1 / 120)
    tc = _row(framework="torch-compile", image_size=256, batch=64, img_per_s=60.0, s_per_image=1 / 60)
    window = _row(image_size=256, batch=64, policy="window", budget=0.5)  # nothing compares with it
    day2 = dict(day1, date="2026-12-05", img_per_s=150.0, s_per_image=1 / 150)
    merged = mt.merge([day1, tc, window], [day2, dict(window, date="2026-12-05")])
    anchors = [r for r in merged if r.get("anchor")]
    assert anchors == [dict(day1, anchor=True)] and mt.check_rows(merged)  # the window's old row went
    # the throughput tables show the new row; PyTorch's table and target still pair with the row of its day
    assert mt.find(merged, image_size=256, batch=64) is not None
    assert mt.find(merged, image_size=256, batch=64)["img_per_s"] == 150.0
    assert next(x for x in mt.t_throughput(merged, ("GPT-XL",)) if x.startswith("| GPT-XL | 256 | 64 |")).split(
        " | ")[3] == "150.0"
    assert next(x for x in mt.t_torch(merged) if x.startswith("| GPT-XL | 256 | 64 |")).endswith("| 120.0 |  | 2.00x |")
    assert "2.00x at 256 px batch 64 | reported" in "\n".join(mt.t_targets(merged))
    assert "(1 configurations)" in mt.t_versions([r for r in merged if r["framework"] == "adsa_jax"
                                                  and r["policy"] == "dense"])[0]
    # PyTorch measured again on the new row's day: the anchor has done its work and goes
    again = mt.merge(merged, [dict(tc, date="2026-12-05", img_per_s=75.0, s_per_image=1 / 75)])
    assert not [r for r in again if r.get("anchor")]
    assert next(x for x in mt.t_torch(again) if x.startswith("| GPT-XL | 256 | 64 |")).endswith("| 150.0 |  | 2.00x |")
    # a --batch-invariant row keeps the plain row of its day the same way
    inv = _row(batch=64, invariant_group=32, img_per_s=20.0, s_per_image=1 / 20)
    plain = _row(batch=64, img_per_s=40.0, s_per_image=1 / 40, s_per_call=1.6)
    inv["s_per_call"] = 3.2
    kept = mt.merge([plain, inv], [dict(plain, date="2026-12-05")])
    assert [r["date"] for r in kept if r.get("anchor")] == ["2026-12-02"]
    assert "dense 3.200 s, 2.00x the time" in "\n".join(mt.t_targets(kept))
    with pytest.raises(mt.TableError, match="anchor='yes'"):
        mt.check_rows([dict(plain, anchor="yes")])


def test_equal_memory_target_pairs_the_rows_of_one_cap():
    dense = _row(batch=100, memory_cap_gib=40.0, img_per_s=10.0, s_per_image=0.1)
    evict = _row(batch=200, memory_cap_gib=40.0, policy="adsa-evict", budget=0.5, granularity="head",
                 img_per_s=16.0, s_per_image=1 / 16)
    line = next(x for x in mt.t_targets([dense, evict]) if "memory cap" in x)
    assert "1.60x at 384 px, 40 GiB | met" in line
    # with the rows' floors: the same two batches at their floors, (200 / 6.25) / (100 / 4) = 1.28x
    line = next(x for x in mt.t_targets([dict(dense, floor_s=4.0), dict(evict, floor_s=6.25)]) if "memory cap" in x)
    assert "1.60x at 384 px, 40 GiB (at both batches' floors: 1.28x at 384 px, 40 GiB) | met" in line


def test_a_new_cap_search_replaces_the_old_one_and_fills_the_cap_table():
    old = _row(batch=184, memory_cap_gib=40.0, img_per_s=46.8, s_per_image=1 / 46.8)
    new = _row(batch=191, memory_cap_gib=40.0, img_per_s=45.7, s_per_image=1 / 45.7, date="2026-12-04")
    evict = _row(batch=369, memory_cap_gib=40.0, policy="adsa-evict", budget=0.5, granularity="head",
                 img_per_s=43.6, s_per_image=1 / 43.6, date="2026-12-04")
    merged = mt.merge([old], [new, evict])
    assert [r["batch"] for r in merged] == [191, 369]
    # another device's search: its own row, its ratio against its own dense, after the H200's
    h100 = [dict(r, device="NVIDIA H100 80GB HBM3", img_per_s=r["img_per_s"] / 2) for r in (new, evict)]
    table = "\n".join(mt.t_cap(h100 + merged))
    assert "| GPT-XL | 384 | 40 | H200 | 191: 45.7 | 369: 43.6, 0.95x | not measured |" in table
    assert table.index("| H200 |") < table.index("| H100 80GB HBM3 | 191: 22.9 | 369: 21.8, 0.95x |")


def test_layer_target_names_the_period_that_meets_it():
    head = _row(batch=64, policy="adsa-evict", budget=0.5, granularity="head", s_per_image=2.0)
    layer = _row(batch=64, policy="adsa-evict", budget=0.5, granularity="layer", s_per_image=2.7)
    layer8 = _row(batch=64, policy="adsa-evict", budget=0.5, granularity="layer", period=8, s_per_image=2.1)
    line = next(x for x in mt.t_targets([head, layer, layer8]) if "layer granularity" in x)
    assert "1.35x at period 1; 1.05x at period 8 | met at period 8 only" in line
