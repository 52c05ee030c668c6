"""What of benchmarks/gpu_check.py needs no GPU: arguments, the plan, the goals, the files, the parsers.

The figures below are made up for the tests (none of this has run on a
GPU); each goal test sets figures on both sides of its threshold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gpu_check  # noqa: E402

HERE = Path(__file__).parent


def test_without_a_gpu_it_exits_2_and_says_why():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(HERE / "gpu_check.py"), "--quick"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device is visible" in proc.stderr


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.elements == 1 << 28 and args.budget == 450 and args.out is None and not args.quick
    args = gpu_check.parse_args(["--quick", "--out", "x", "--skip-bench", "--budget", "100"])
    assert args.elements == 1 << 22 and args.out == Path("x") and args.skip_bench and args.budget == 100


def test_the_plan_covers_every_op_dtype_and_row_length():
    cases = gpu_check.plan(1 << 28)
    assert len(cases) == len(gpu_check.OPS) * len(gpu_check.DTYPES) * len(gpu_check.COLUMNS)
    assert {c for *_, c in cases} == {1024, 4096, 16384, 32768, 65536, 131072, 262144}
    assert all(rows * cols == 1 << 28 for _, _, rows, cols in cases)
    assert {c for *_, c in gpu_check.plan(1 << 22, quick=True)} == set(gpu_check.QUICK_COLUMNS)


def test_bytes_that_must_move():
    assert gpu_check.bytes_moved("softmax_fwd", "float32", 10, 100) == 2 * 1000 * 4
    assert gpu_check.bytes_moved("softmax_fwd_bwd", "bfloat16", 10, 100) == 5 * 1000 * 2
    assert gpu_check.bytes_moved("cross_entropy_fwd_bwd", "bfloat16", 10, 100) == 3 * 1000 * 2 + 16 * 10


def _row(op, dtype, cols, provider, gbps, peak=None):
    rows = (1 << 20) // cols
    b = gpu_check.bytes_moved(op, dtype, rows, cols)
    row = {"op": op, "dtype": dtype, "rows": rows, "cols": cols, "provider": provider, "bytes": b, "gbps": gbps, "ms": b / (gbps * 1e9) * 1e3}
    if peak is not None:
        row["peak_added_bytes"] = peak * rows * cols * {"float32": 4, "bfloat16": 2}[dtype]
    return row


def recorded(softmax_gbps=4000.0, compile_gbps=3800.0, ce_gbps=3800.0, eager_gbps=1500.0, peak=1.0):
    """A results dictionary as main() writes it, with figures chosen by the test."""
    bench = []
    for dtype in gpu_check.DTYPES:
        for cols in gpu_check.COLUMNS:
            bench.append(_row("softmax_fwd", dtype, cols, "fastsoftmax", softmax_gbps))
            bench.append(_row("softmax_fwd", dtype, cols, "torch.compile", compile_gbps))
            bench.append(_row("softmax_fwd", dtype, cols, "torch", 3000.0))
            bench.append(_row("cross_entropy_fwd_bwd", dtype, cols, "fastsoftmax", ce_gbps, peak=peak))
            bench.append(_row("cross_entropy_fwd_bwd", dtype, cols, "torch", eager_gbps))
            bench.append(_row("cross_entropy_fwd_bwd", dtype, cols, "torch.compile", 3000.0))
    return {
        "gpu": {"name": "NVIDIA H200", "capability": [9, 0], "torch": "2.11.0", "numba_cuda": "0.30.4", "driver": "580"},
        "copy_gbps": 4300.0,
        "tests": {"returncode": 0, "passed": 250, "failed": 0, "errors": 0, "skipped": 1},
        "sanitizer": {"memcheck": {"ok": True, "errors": 0, "detail": "0 errors"}, "racecheck": {"ok": True, "errors": 0, "detail": "0 errors"}},
        "bench": bench,
        "notes": [],
    }


def _verdicts(results):
    return {g["goal"]: g["holds"] for g in gpu_check.evaluate_goals(results)}


def test_goals_hold_when_the_figures_meet_them():
    verdicts = _verdicts(recorded())
    assert verdicts and all(verdicts.values()), verdicts


@pytest.mark.parametrize(
    "figures,missed",
    [
        (dict(softmax_gbps=3800.0), "softmax forward float32 >= 90% of copy"),  # 0.88 of 4300
        (dict(compile_gbps=4100.0), "softmax forward bfloat16 at least as fast as torch.compile"),
        (dict(ce_gbps=3600.0), "cross-entropy fwd+bwd float32, V=4k"),  # 0.84 of 4300
        (dict(eager_gbps=2000.0), "cross-entropy fwd+bwd bfloat16, V=128k"),  # 1.9x eager
        (dict(peak=1.2), "cross-entropy fwd+bwd float32, V=128k"),
    ],
)
def test_a_goal_is_missed_when_its_figure_is_short(figures, missed):
    verdicts = _verdicts(recorded(**figures))
    failing = [goal for goal, holds in verdicts.items() if holds is False]
    assert any(goal.startswith(missed) for goal in failing), failing


def test_the_peak_goal_counts_memory_added_to_the_logits():
    """1.05x holds: the gradient and a few bytes a row, beyond the logits already allocated (total memory would be 2x and more)."""
    verdicts = _verdicts(recorded(peak=1.05))
    peak_goals = {goal: holds for goal, holds in verdicts.items() if "peak added <= 1.1x logits" in goal}
    assert len(peak_goals) == len(gpu_check.DTYPES) * len(gpu_check.CE_GOAL_COLUMNS) and all(peak_goals.values()), verdicts
    assert "beyond what was allocated before it" in gpu_check.CE_PEAK_ADDED


def test_goals_not_measured_are_unknown_not_held():
    results = recorded()
    results["bench"] = []
    del results["tests"]
    verdicts = _verdicts(results)
    assert all(holds is None for goal, holds in verdicts.items() if "sanitizer" not in goal)


def test_correctness_sets_the_exit_status():
    results = recorded(softmax_gbps=100.0)  # slow, but correct
    assert gpu_check.correctness_holds(results)
    results["sanitizer"]["racecheck"]["ok"] = False
    assert not gpu_check.correctness_holds(results)
    results = recorded()
    results["tests"]["failed"] = 1
    assert not gpu_check.correctness_holds(results)


def test_files_from_recorded_figures(tmp_path):
    results = recorded(softmax_gbps=3800.0)
    gpu_check.write_outputs(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["gpu"]["name"] == "NVIDIA H200" and saved["goals"]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("# fastsoftmax on NVIDIA H200")
    assert "| softmax_fwd | float32 | 1024x1024 |" in table and "**MISSED**: softmax forward float32" in table
    assert f"Cross-entropy memory: {gpu_check.CE_PEAK_ADDED}" in table and "| peak added / logits |" in table
    assert "| cross_entropy_fwd_bwd | bfloat16 | 32x32768 |" in table and table.count("| 1.00 |") == 2 * len(gpu_check.COLUMNS)
    png = tmp_path / "bandwidth.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" or any("matplotlib" in n for n in saved["notes"])


def test_sanitizer_and_pytest_reports_are_read(tmp_path):
    class Done:
        def __init__(self, code):
            self.returncode = code

        def wait(self, timeout=None):
            return self.returncode

    log = tmp_path / "memcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\nsanitize cases: 85 kernels launched\n========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.sanitizer_result((Done(0), log), 1)["ok"] is True
    log.write_text("========= Invalid __global__ read of size 16 bytes\n========= ERROR SUMMARY: 2 errors\n")
    result = gpu_check.sanitizer_result((Done(86), log), 1)
    assert result["ok"] is False and result["errors"] == 2
    assert gpu_check.sanitizer_result(None, 1)["ok"] is None  # no compute-sanitizer here
    xml = tmp_path / "pytest.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"></testsuite></testsuites>')
    out = gpu_check.tests_result((Done(1), tmp_path / "pytest.log", xml), 1)
    assert (out["passed"], out["failed"], out["skipped"], out["returncode"]) == (7, 1, 2, 1)


def test_gpu_names_become_folder_names():
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_array_bench_step_skips_without_cupy_or_time(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    assert gpu_check.run_array_bench(tmp_path, 300) == {"skipped": "cupy is not installed"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert gpu_check.run_array_bench(tmp_path, 5) == {"skipped": "time budget"}
