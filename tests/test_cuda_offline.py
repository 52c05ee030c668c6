"""CUDA with no GPU: every kernel built as numba-cuda builds it at run time and gated, and the simulator.

Three processes start together as soon as the tests are collected
(``conftest.py``), and the tests here wait for what they need: two halves of ``cuda_gates.py`` (each kernel compiled
once and linked with nvJitLink and link-time optimisation for sm_90a and
sm_80) and ``cuda_sim_driver.py --torch`` (the kernels and the torch side
in numba-cuda's simulator). The gates, per kernel and architecture:

* no spills and no stack: 0 bytes of spill stores and loads, a 0-byte stack
  frame (from ptxas's report and, for the frame, the cubin itself), and no
  local memory in the PTX: the rows kept "in registers" are in registers;
* registers within the budget of its launch bounds
  (:func:`fastsoftmax.kernels.cuda.register_budget`: 128, or 64 for the
  1024-thread kernels), the bounds declared in its PTX;
* no float64 instruction unless it is a float64 kernel (opcodes of the
  post-LTO PTX, sm_90a), except in the array API's log-sum-exp, whose
  result is float64: there, only the instructions of that result
  (:data:`LSE_RESULT_F64`);
* 128-bit loads (and stores, where it writes rows) in every row kernel
  but the log-sum-exp, which reads one element per thread (:data:`SCALAR_ROWS`);
* a name that says op, dtype and launch shape.

``cuda_gate_controls.py`` holds one kernel built to fail each gate; they are
built with the others and must fail.

Reports are kept in ``~/.cache/fastsoftmax/cuda-gates`` under a digest of
the kernels' and the gate tools' sources and the compilers' versions, so an
unchanged tree is not rebuilt (about a minute of the two cores otherwise);
``FASTSOFTMAX_GATES_CACHE=0`` rebuilds every time, any other value names the
folder.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent

try:
    from fastsoftmax.kernels import cuda as kernels
    from fastsoftmax.kernels.cuda_codec import SHORT
except ImportError:  # pragma: no cover - numba-cuda missing
    kernels = None

pytestmark = pytest.mark.skipif(kernels is None, reason="numba-cuda is not installed")

KERNELS = {kernels.spec(family, *args)[0]: (family, args) for family, args in kernels.all_kernels() + kernels.array_kernels()} if kernels else {}
SHARDS = 2

#: Families whose kernels read rows (128-bit loads expected) and write rows (128-bit stores expected).
READS_ROWS = {"softmax_fwd", "softmax_bwd", "ce_fwd", "ce_bwd", "ce_prob_fwd", "ce_prob_bwd"}
WRITES_ROWS = {"softmax_fwd", "softmax_bwd", "ce_bwd", "ce_prob_bwd"}
#: Families whose kernels read their rows one element per thread, consecutive threads on consecutive
#: elements (coalesced, whatever the alignment), and write no rows: the array API's log-sum-exp. The
#: 128-bit load and store gates do not apply to them.
SCALAR_ROWS = {"logsumexp"}
MODULES = {
    "softmax_fwd": "cuda_softmax", "softmax_bwd": "cuda_softmax", "ce_finish": "cuda_ce_finish", "ce_check_targets": "cuda_ce_finish",
    "logsumexp": "cuda_lse",
}

#: The float64 instructions a float32 or float16 log-sum-exp kernel may hold: its output is float64
#: (SciPy's result dtype, which a float32 log would round), so the block's max ``m`` and sum ``s``
#: are widened once each (exactly two ``cvt.f64.f32``), ``m + log(s)`` runs in float64 (libdevice's
#: log: these arithmetic, move and select opcodes), and the result is stored (``st.global.f64``).
#: Nothing else: a float64 load, compare, shared-memory access or other conversion, or a third
#: widening, would mean the per-element fold ran in float64 (a ``-math.inf`` constant, say).
LSE_WIDENED = {"cvt.f64.f32": 2}
LSE_RESULT_F64 = frozenset({"add.f64", "sub.f64", "mul.f64", "fma.rn.f64", "neg.f64", "rcp.approx.ftz.f64", "mov.f64", "selp.f64", "st.global.f64"})


def lse_f64_beyond_its_result(f64: dict) -> dict:
    """The float64 opcodes (with counts) of a non-float64 log-sum-exp kernel that its float64 result does not explain."""
    out = {op: n for op, n in f64.items() if op not in LSE_WIDENED and op not in LSE_RESULT_F64}
    out.update({op: f64.get(op, 0) for op, n in LSE_WIDENED.items() if f64.get(op, 0) != n})
    return out


class Background:
    """The gate shards and the simulator, started together, each writing a log and its exit status to ``tmp``.

    Only one process starts them (``start=True``); under pytest-xdist every
    worker makes a ``Background`` on the same folder and waits on its files,
    so whichever worker runs the tests here reads what the starter launched.
    """

    def __init__(self, tmp: Path, start: bool = True):
        self.tmp = tmp
        self.paths = [tmp / f"gates{i}.json" for i in range(SHARDS)]
        self.procs = []
        self._report = None
        if start:
            tmp.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            cache = os.environ.get("FASTSOFTMAX_GATES_CACHE", str(Path.home() / ".cache" / "fastsoftmax" / "cuda-gates"))
            gate = [sys.executable, str(HERE / "cuda_gates.py")] + (["--cache", cache] if cache != "0" else [])
            for i, path in enumerate(self.paths):
                controls = ["--controls"] if i == SHARDS - 1 else []
                self._launch(f"gates{i}", gate + ["--shard", f"{i}/{SHARDS}", "--json", str(path)] + controls, env)
            self._launch("sim", [sys.executable, str(HERE / "cuda_sim_driver.py"), "--torch"], dict(env, NUMBA_ENABLE_CUDASIM="1"))

    def _launch(self, name: str, cmd: list, env: dict):
        """Run ``cmd`` with its output in ``name.log``; ``name.rc`` appears, whole, when it ends."""
        log, rc = self.tmp / f"{name}.log", self.tmp / f"{name}.rc"
        script = 'out=$1; rc=$2; shift 2; "$@" >"$out" 2>&1; echo $? >"$rc.part"; mv "$rc.part" "$rc"'
        self.procs.append(subprocess.Popen(["sh", "-c", script, "sh", str(log), str(rc), *cmd], cwd=HERE, env=env, start_new_session=True))

    def _wait(self, name: str, timeout: float = 900) -> tuple:
        rc = self.tmp / f"{name}.rc"
        deadline = time.monotonic() + timeout
        while not rc.exists():
            assert time.monotonic() < deadline, f"{name} did not finish in {timeout} s"
            time.sleep(0.2)
        return int(rc.read_text()), (self.tmp / f"{name}.log").read_text()

    def simulator(self):
        return self._wait("sim")

    def report(self) -> dict:
        if self._report is None:
            merged = {}
            for i, path in enumerate(self.paths):
                code, out = self._wait(f"gates{i}")
                assert code == 0, out[-4000:]
                merged.update(json.loads(path.read_text()))
            self._report = merged
        return self._report

    def close(self, wait: float = 0.0):
        """Wait up to ``wait`` seconds for what this process started (another worker may still read it), then stop it."""
        deadline = time.monotonic() + wait
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the shell and the process under it
                proc.wait()


@pytest.fixture(scope="module")
def background(request, tmp_path_factory):
    started = getattr(request.config, "cuda_background", None)  # by conftest.py, when the tests were collected
    if started is not None:
        yield started
        return
    bg = Background(tmp_path_factory.mktemp("cuda"))
    yield bg
    bg.close()


def test_simulator_runs_every_kernel_and_the_torch_side(background):
    """Every launch shape, aligned and unaligned rows, every dtype (bfloat16 too), the shuffle reductions
    with real 32-lane warps, two warps a block and partial last blocks, one and two chunks a thread
    (float32 and bfloat16 warp and block kernels, forward and backward, with a partial last chunk);
    then the CUDA design's torch side."""
    code, out = background.simulator()
    assert code == 0, out[-6000:]
    assert "all simulator checks passed" in out


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_passes_the_gates(background, name):
    family, args = KERNELS[name]
    r = background.report()[name]
    budget = kernels.register_budget(r["max_threads"])
    for arch, got in r["archs"].items():
        res, cubin = got["resources"], got["cubin"]
        assert res["spill_stores"] == res["spill_loads"] == 0, f"{arch}: spills {res}"
        assert res["stack_frame"] == res["cumulative_stack"] == cubin["frame_size"] == 0, f"{arch}: stack {res} {cubin}"
        assert res["registers"] == cubin["registers"] <= budget, f"{arch}: {res['registers']} registers, budget {budget}"
    ptx = r["ptx"]
    assert ptx["declared_bounds"] == list(kernels.launch_bounds(r["max_threads"]))
    assert not ptx["local"], ptx["local"][:5]
    if family == "logsumexp" and "float64" not in args:
        assert not lse_f64_beyond_its_result(ptx["f64"]), f"float64 beyond the result in a {args[0]} kernel: {ptx['f64']}"
    elif "float64" not in args:
        assert not ptx["f64"], f"float64 instructions in a {args[0]} kernel: {ptx['f64']}"
    if family not in SCALAR_ROWS:
        loads = {op for op, kind, bits in ptx["vector"] if kind == "ld" and bits == 128}
        stores = {op for op, kind, bits in ptx["vector"] if kind == "st" and bits == 128}
        assert bool(loads) == (family in READS_ROWS), ptx["vector"]
        assert bool(stores) == (family in WRITES_ROWS), ptx["vector"]
    module = MODULES.get(family, "cuda_cross_entropy")
    assert r["readable"] == f"fastsoftmax.kernels.{module}.{name}"  # the entry point a profiler shows
    assert name.startswith(_op_and_dtype(family, args))


def _op_and_dtype(family, args) -> str:
    """What a kernel's name must start with: op, direction, dtype, launch shape."""
    if family.startswith("softmax"):
        dtype, log, shape = args
        return f"{'log_' if log else ''}{family}_{SHORT[dtype]}_{shape}"
    if family == "ce_check_targets":
        return family
    return "_".join([family, SHORT[args[0]], *args[1:]])


def test_the_controls_fail_their_gates(background):
    """A kernel in float32 with ``-math.inf``, a dynamically indexed local array, scalar loads, too many live values."""
    report = background.report()
    promoted = report["control_promoted_to_float64"]["ptx"]["f64"]
    assert "fma.rn.f64" in promoted and "cvt.f64.f32" in promoted
    assert lse_f64_beyond_its_result(promoted)  # a fold in float64 is not excused as the log-sum-exp's result
    assert report["control_local_array"]["ptx"]["local"]
    assert not [v for v in report["control_scalar_loads"]["ptx"]["vector"] if v[2] == 128]
    for arch in ("sm_90a", "sm_80"):
        res = report["control_spilling"]["archs"][arch]["resources"]
        assert res["spill_stores"] > 0 and res["stack_frame"] > 0


def test_every_planned_kernel_is_gated():
    """The plans pick only kernels the gates built, for every dtype and row length from 1 to 2**20."""
    lengths = sorted({1, 2, 3, 31, 1000, 1023, 1024, 1025, 4096, 6144, 8192, 16384, 24576, 32768, 32769, 1 << 20}
                     | {2**k + d for k in range(4, 20) for d in (-1, 0, 1)})
    wanted = set(kernels.all_kernels())
    for dtype in kernels.DTYPES:
        for n_cols in lengths:
            for log in (False, True):
                for backward in (False, True):
                    shape = kernels.softmax_plan(n_cols, dtype, log, backward)[0]
                    assert ("softmax_bwd" if backward else "softmax_fwd", (dtype, log, shape)) in wanted
            shape = kernels.ce_plan(n_cols, dtype)[0]
            for family in ("ce_fwd", "ce_bwd", "ce_prob_fwd", "ce_prob_bwd"):
                assert (family, (dtype, shape)) in wanted


def test_the_readme_table_of_rows_on_chip_is_what_the_plans_do():
    """Each limit of the README's table is the longest row the plans keep on chip: a block kernel there, the online kernel one column past it."""
    text = (HERE.parent / "README.md").read_text()
    rows = re.findall(r"^\| (log-softmax|softmax) (forward|backward): [^|]*\| (\d+) \| (\d+) \| (\d+) \|$", text, re.M)
    assert len(rows) == 4, rows
    for op, direction, *limits in rows:
        log, backward = op == "log-softmax", direction == "backward"
        for dtypes, limit in zip((("float32",), ("float64",), ("float16", "bfloat16")), map(int, limits)):
            for dtype in dtypes:
                assert kernels.softmax_plan(limit, dtype, log, backward)[0] == "block", (op, direction, dtype, limit)
                assert kernels.softmax_plan(limit + 1, dtype, log, backward)[0] == "online", (op, direction, dtype, limit)
