"""The benchmark engine on a tiny matrix: rows, ratios, byte counts, plots."""

import pytest
import torch

from fastsoftmax.apps import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_reports_consistent_rows_and_plots(tmp_path):
    providers = ("naive", "torch", "fastsoftmax")
    results = bench.run([(8, 16)], providers=providers, repeats=3, memory=True, log=lambda *_: None, min_seconds=0.0)
    rows = results["rows"]
    assert len(rows) == len(bench.OPS) * len(providers)
    for op in bench.OPS:
        by_provider = {r["provider"]: r for r in rows if r["op"] == op}
        assert set(by_provider) == set(providers)
        for r in by_provider.values():
            assert r["bytes"] == bench.BYTES_PER_ELEMENT[op] * 8 * 16 * 4
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
            assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / r["copy_gbps"])
            assert len(r["times_s"]) == 3 and r["peak_bytes"] >= 0
            for other, ratio in r["speedup_over"].items():
                assert ratio == pytest.approx(by_provider[other]["median_s"] / r["median_s"])
    assert "torch" in results["machine"] and results["machine"]["cores"] >= 1
    bench.plot(results, tmp_path)
    for png in ("bandwidth.png", "speedup.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG_MAGIC)
    assert "vs torch" in bench.format_rows([r for r in rows if r["op"] == "softmax_fwd"])


@pytest.mark.parametrize("op", bench.OPS)
def test_every_provider_computes_the_same_thing(op):
    # the providers must agree, or the benchmark compares different work
    case = bench.make_case(op, 16, 33, torch.float64, providers=bench.PROVIDERS[:2] + ("fastsoftmax",))
    if op.endswith("fwd"):
        outs = {p: call() for p, call in case.calls.items()}
        torch.testing.assert_close(outs["fastsoftmax"], outs["torch"])
        torch.testing.assert_close(outs["naive"], outs["torch"])
    else:
        for call in case.calls.values():
            assert call() is None  # fwd+bwd calls run and clear the gradient


def test_unknown_op_and_provider():
    with pytest.raises(ValueError, match="unknown op"):
        bench.make_case("softmin", 2, 2)
    with pytest.raises(ValueError, match="unknown provider"):
        bench.make_case("softmax_fwd", 2, 2, providers=("jax",))


def test_time_case_runs_every_provider_each_repetition_in_a_varying_order():
    calls = []
    case = bench.Case("softmax_fwd", 1, 1, torch.float32, "cpu", calls={p: (lambda p=p: calls.append(p)) for p in "abcd"})
    times = bench.time_case(case, repeats=20, warmup=0)
    assert {p: len(t) for p, t in times.items()} == {p: 20 for p in "abcd"}
    rounds = [tuple(calls[i : i + 4]) for i in range(0, 80, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
    assert {r[0] for r in rounds} == set("abcd")  # each provider sometimes runs first


def test_time_case_repeats_small_cases_until_each_provider_has_its_time():
    import time

    # repetitions go on until the fastest provider's calls add up to min_seconds, or max_repeats
    case = bench.Case("softmax_fwd", 1, 1, torch.float32, "cpu", calls={"slow": lambda: time.sleep(0.002), "fast": lambda: None})
    times = bench.time_case(case, repeats=3, warmup=0, min_seconds=0.01, max_repeats=20)
    assert len(times["slow"]) == len(times["fast"]) == 20  # no-ops never add up to 10 ms in 20 calls
    case.calls["fast"] = lambda: time.sleep(0.001)
    times = bench.time_case(case, repeats=3, warmup=0, min_seconds=0.01, max_repeats=1000)
    assert len(times["slow"]) == len(times["fast"]) > 3
    assert sum(times["fast"]) >= 0.01 > sum(times["fast"][:-1])  # stopped as soon as it got there
    times = bench.time_case(case, repeats=3, warmup=0, min_seconds=0.0)
    assert len(times["slow"]) == 3


def test_per_call_script_runs_and_reports_every_op(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "per_call.py"
    spec = importlib.util.spec_from_file_location("per_call", path)
    per_call = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(per_call)
    assert per_call.main(["--calls", "5", "--out", str(tmp_path / "per_call.json")]) == 0
    rows = json.loads((tmp_path / "per_call.json").read_text())["rows"]
    timed = [r for r in rows if "speedup" in r]
    assert {(r["op"], r["caches"]) for r in timed} == {(op, c) for op in per_call.cases() for c in ("hot", "cold")}
    for r in timed:
        assert r["speedup"] == pytest.approx(r["torch_us"] / r["ours_us"])


def test_book_path_script_reports_every_stage(tmp_path):
    """benchmarks/book_path.py: the staged D2L step, both losses, ratios consistent with the medians."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "book_path.py"
    spec = importlib.util.spec_from_file_location("book_path", path)
    book_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(book_path)
    assert book_path.main(["--repeats", "2", "--steps", "2", "--no-asm", "--out", str(tmp_path / "book_path.json")]) == 0
    result = json.loads((tmp_path / "book_path.json").read_text())
    medians, ratio = result["median_us"], result["torch_over_ours"]
    assert set(medians) == {"torch", "fastsoftmax"}
    for stage in (*book_path.STAGES, "step"):
        assert ratio[stage] == pytest.approx(medians["torch"][stage] / medians["fastsoftmax"][stage])
        assert all(m[stage] > 0 for m in medians.values())


def test_pairwise_script_runs_and_reports_every_op(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pairwise.py"
    spec = importlib.util.spec_from_file_location("pairwise", path)
    pairwise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairwise)
    assert pairwise.main(["--rows", "16", "--cols", "33", "--calls", "3", "--out", str(tmp_path / "pairwise.json")]) == 0
    rows = json.loads((tmp_path / "pairwise.json").read_text())["rows"]
    assert [r["op"] for r in rows] == list(bench.OPS)
    for r in rows:
        assert r["shape"] == [16, 33] and r["speedup"] == pytest.approx(r["torch_ms"] / r["ours_ms"])
