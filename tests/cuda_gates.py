"""Build every CUDA kernel for sm_90a and sm_80 as numba-cuda would at run time, and report what ptxas made of each.

    python tests/cuda_gates.py --shard 0/2 --json out.json [--controls] [--cache DIR]

writes ``{kernel name: {...}}`` for every ``n``-th kernel of :func:`gated`
(the backend's kernels and the array API's) starting at the shard's index:
the mangled entry name, the launch bounds, and per architecture the
ptxas resources (registers, stack frame, spills, shared memory), the
cubin's own register count and frame size, and (sm_90a) the post-LTO PTX's
float64 opcodes, vector accesses, local-memory uses and declared launch
bounds. ``tests/test_cuda_offline.py`` runs two shards at once and asserts
on the result. No GPU is needed: NVVM and nvJitLink run in this process.
With ``--cache``, a report is kept under a digest of the kernels' and this
tool's sources and the compilers' versions (:func:`fingerprint`), and reused
while none of them changes.
"""

import argparse
import hashlib
import json
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import cuda_offline  # noqa: E402
from fastsoftmax.kernels import cuda as kernels  # noqa: E402


def gated() -> list:
    """``[(family, args)]`` of every kernel gated: the backend's (:func:`~fastsoftmax.kernels.cuda.all_kernels`) and the array API's."""
    return kernels.all_kernels() + kernels.array_kernels()


def report(family: str, args: tuple) -> tuple:
    if family == "control":
        import cuda_gate_controls

        name = args[0]
        pyfunc, signature, max_threads, _ = cuda_gate_controls.CONTROLS[name]
    else:
        name, pyfunc, signature, max_threads = kernels.spec(family, *args)
    bounds = kernels.launch_bounds(max_threads)
    start = time.perf_counter()
    entry, archs = cuda_offline.build(pyfunc, signature, bounds)
    ptx = archs["sm_90a"].pop("ptx")
    archs["sm_80"].pop("ptx")
    return name, {
        "family": family,
        "args": list(args),
        "entry": entry,
        "readable": cuda_offline.readable_name(entry),
        "max_threads": max_threads,
        "launch_bounds": list(bounds),
        "archs": archs,
        "ptx": {
            "f64": cuda_offline.f64_instructions(ptx),
            "vector": cuda_offline.vector_accesses(ptx),
            "local": cuda_offline.local_memory(ptx),
            "declared_bounds": list(cuda_offline.launch_bounds_of(ptx)),
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def fingerprint() -> str:
    """A digest of everything a report depends on: the kernels' sources, this tool's, and the compilers' versions.

    Compiling is deterministic, so a report stored under this digest is the
    report a fresh build would give.
    """
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    sources = sorted((root / "kernels").glob("cuda*.py")) + [root / "kernels" / "rowmath.py"]  # rowmath: the log-sum-exp kernel's merge
    for path in sources + sorted(Path(__file__).parent.glob("cuda_gate*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update((Path(__file__).parent / "cuda_offline.py").read_bytes())
    for package in ("numba", "numba-cuda", "nvidia-nvjitlink", "nvidia-cuda-nvrtc", "cuda-bindings"):
        try:
            digest.update(f"{package}={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(package.encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th kernel from the i-th")
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--only", nargs="*", default=None, help="kernel names to build (default: all of the shard)")
    parser.add_argument("--controls", action="store_true", help="also build the kernels made to fail (tests/cuda_gate_controls.py)")
    parser.add_argument("--cache", default=None, help="a folder keeping reports by fingerprint (reused when nothing changed)")
    args = parser.parse_args(argv)
    cached = Path(args.cache) / f"{fingerprint()}-{args.shard.replace('/', 'of')}{'-controls' if args.controls else ''}.json" if args.cache else None
    if cached is not None and cached.exists() and not args.only:
        Path(args.json).write_text(cached.read_text())
        return 0
    index, count = (int(v) for v in args.shard.split("/"))
    todo = gated()[index::count]
    if args.controls:
        import cuda_gate_controls

        todo += [("control", (name,)) for name in cuda_gate_controls.CONTROLS]
    out = {}
    for family, fargs in todo:
        if args.only and (fargs[0] if family == "control" else kernels.spec(family, *fargs)[0]) not in args.only:
            continue
        name, result = report(family, tuple(fargs))
        out[name] = result
    text = json.dumps(out, indent=1, sort_keys=True)
    Path(args.json).write_text(text)
    if cached is not None and not args.only:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
