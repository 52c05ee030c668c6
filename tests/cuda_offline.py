"""Build a numba-cuda kernel the way numba-cuda does at run time, with no GPU, and read what ptxas made of it.

At its first launch on a GPU, ``cuda.jit`` compiles a kernel to LTO-IR
(NVVM ``-gen-lto``) and links it with nvJitLink with link-time optimisation,
for ``sm_90a`` on a compute capability 9.0 device and ``sm_80`` on 8.0
(``lto`` defaults to True wherever nvJitLink is installed). Registers,
spills and stack differ a lot between that and a plain PTX compile, so the
gates measure this link:

* :func:`build`: numba's own compile path (``compile_cuda`` with
  ``lto=True``, the kernel fix-ups, the launch bounds), then, per
  architecture, NVVM and an nvJitLink ``-lto -verbose`` link to a cubin,
  and one more link to the post-LTO PTX.
* :func:`parse_ptxas_log`: registers, stack frame, spill stores and loads,
  shared memory, from the ``-verbose`` log; :func:`parse_cubin` reads
  registers and the stack frame from the cubin's ELF (no tool needed), a
  cross-check of the log.
* :func:`f64_instructions`, :func:`vector_accesses`, :func:`local_memory`:
  opcode-level PTX checks (``%f64`` is a register name, not an instruction).
* :func:`readable_name`: the kernel's entry point, demangled to
  ``module.qualname``.

numba-cuda compiles a device function for the current device's compute
capability, which needs a driver; :func:`build` answers 9.0 for it while it
compiles (the IR is the same for both architectures; NVVM then targets each).
"""

import re
import struct
from contextlib import contextmanager

from cuda.bindings import nvjitlink


def arch_name(cc) -> str:
    """(9, 0, "a") -> "sm_90a"."""
    return "sm_%d%d%s" % (cc[0], cc[1], cc[2] if len(cc) > 2 else "")


#: What numba links for on a device of each compute capability.
ARCHS = {"sm_90a": (9, 0, "a"), "sm_80": (8, 0)}


@contextmanager
def _offline_device(cc=(9, 0)):
    from numba.cuda import dispatcher

    class Device:
        compute_capability = cc

    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: Device()
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def compile_library(pyfunc, signature, launch_bounds):
    """The code library ``cuda.jit(signature, launch_bounds=...)`` builds at its first launch (mirrors ``_Kernel.__init__``)."""
    from numba.cuda import types
    from numba.cuda.compiler import compile_cuda, kernel_fixup
    from numba.cuda.core import sigutils
    from numba.cuda.cudadrv import nvvm

    args, _ = sigutils.normalize_signature(signature)
    with _offline_device():
        cres = compile_cuda(
            pyfunc, types.void, args, debug=False, lineinfo=False, forceinline=False, fastmath=False,
            nvvm_options={"fastmath": False, "opt": 3}, cc=(9, 0), max_registers=None, lto=True,
        )
    lib = cres.library
    kernel = lib.get_function(cres.fndesc.llvm_func_name)
    lib._entry_name = cres.fndesc.llvm_func_name
    kernel_fixup(kernel, False)
    nvvm.set_launch_bounds(kernel, launch_bounds)
    return lib


def _linked_inputs(lib, cc):
    """The LTO-IR modules numba's linker gets for ``cc`` (the kernel and anything it links in)."""
    from numba.cuda.cudadrv import driver

    linker = driver._Linker(max_registers=None, cc=cc, lto=True)
    with _offline_device():
        lib._link_all(linker, cc, ignore_nonlto=False)
    return [bytes(code.code) for code in linker._object_codes]


def _log(handle, size, get) -> str:
    buf = bytearray(size(handle))
    if buf:
        get(handle, buf)
    return buf.decode(errors="replace").rstrip("\x00")


def nvjitlink_link(inputs, options, output: str):
    """Link LTO-IR modules; ``output`` "cubin" or "ptx". Returns ``(bytes or str, info log)``."""
    handle = nvjitlink.create(len(options), options)
    try:
        for i, data in enumerate(inputs):
            nvjitlink.add_data(handle, nvjitlink.InputType.LTOIR, data, len(data), f"module{i}")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as error:
            raise RuntimeError(f"nvJitLink: {error}\n{_log(handle, nvjitlink.get_error_log_size, nvjitlink.get_error_log)}") from None
        info = _log(handle, nvjitlink.get_info_log_size, nvjitlink.get_info_log)
        if output == "cubin":
            out = bytearray(nvjitlink.get_linked_cubin_size(handle))
            nvjitlink.get_linked_cubin(handle, out)
            return bytes(out), info
        out = bytearray(nvjitlink.get_linked_ptx_size(handle))
        nvjitlink.get_linked_ptx(handle, out)
        return out.decode().rstrip("\x00"), info
    finally:
        nvjitlink.destroy(handle)


def build(pyfunc, signature, launch_bounds, ptx_for=("sm_90a",)):
    """``{arch: {"resources": {...}, "cubin": {...}, "ptx": str or None}}`` for sm_90a and sm_80, and the entry name."""
    lib = compile_library(pyfunc, signature, launch_bounds)
    out = {}
    for arch, cc in ARCHS.items():
        inputs = _linked_inputs(lib, cc)
        options = [f"-arch={arch}", "-lto"]
        cubin, log = nvjitlink_link(inputs, options + ["-verbose"], "cubin")
        ptx = nvjitlink_link(inputs, options + ["-ptx"], "ptx")[0] if arch in ptx_for else None
        resources = parse_ptxas_log(log)
        (entry,) = resources
        out[arch] = {"resources": resources[entry], "cubin": parse_cubin(cubin).get(entry, {}), "ptx": ptx}
    return entry, out


# --- the ptxas lines of nvJitLink's -verbose log -------------------------------------
#
#   ptxas info    : Compiling entry function '<mangled>' for 'sm_90a'
#   ptxas info    : Function properties for <mangled>
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 64 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)$")
_BYTES = re.compile(r"(\d+) bytes (smem|cmem\[0\]|cumulative stack size)")


def parse_ptxas_log(log: str) -> dict:
    """Per entry function: ``arch, registers, stack_frame, spill_stores, spill_loads, smem, cumulative_stack``."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"arch": m.group(2), "smem": 0, "cumulative_stack": 0})
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            for n, what in _BYTES.findall(m.group(2)):
                current[{"smem": "smem", "cmem[0]": "cmem0", "cumulative stack size": "cumulative_stack"}[what]] = int(n)
    return out


# --- the cubin (ELF) ---------------------------------------------------------------

_EIATTR_FRAME_SIZE = 0x11
_EIATTR_REGCOUNT = 0x2F
_EIFMT_SVAL = 0x04


def parse_cubin(cubin: bytes) -> dict:
    """Per kernel: ``registers`` and ``frame_size``, from ``.nv.info``'s EIATTR_REGCOUNT and EIATTR_FRAME_SIZE."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not a 64-bit ELF cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = []
    for i in range(shnum):
        name, kind, _, _, offset, size, link, info, _, _ = struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
        sections.append({"name": name, "type": kind, "offset": offset, "size": size, "link": link, "info": info})

    def string(table, offset):
        start = table["offset"] + offset
        return cubin[start : cubin.index(b"\0", start)].decode()

    for sec in sections:
        sec["name"] = string(sections[shstrndx], sec["name"])
    symbols = []
    symtab = next((sec for sec in sections if sec["name"] == ".symtab"), None)
    if symtab:
        strtab = sections[symtab["link"]]
        for i in range(symtab["size"] // 24):
            (st_name,) = struct.unpack_from("<I", cubin, symtab["offset"] + 24 * i)
            symbols.append(string(strtab, st_name))
    out = {}
    names = {_EIATTR_FRAME_SIZE: "frame_size", _EIATTR_REGCOUNT: "registers"}
    for sec in sections:
        if sec["name"] == ".nv.info" or sec["name"].startswith(".nv.info."):
            p, end = sec["offset"], sec["offset"] + sec["size"]
            while p + 4 <= end:
                fmt, attr, size = struct.unpack_from("<BBH", cubin, p)
                p += 4
                if fmt == _EIFMT_SVAL:
                    if attr in names and size >= 8:
                        sym, value = struct.unpack_from("<II", cubin, p)
                        out.setdefault(symbols[sym], {})[names[attr]] = value
                    p += size
    return out


# --- PTX ------------------------------------------------------------------------
# An instruction's opcode is the first token of its line (after an optional
# "@%p" guard); a ".f64" in it means float64 work. Searching for "f64"
# anywhere would also find registers such as %f64.

_F64 = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*\.f64\b[\w.:]*)", re.M)
_VECTOR = re.compile(r"^\s*(?:@!?%\w+\s+)?((ld|st)\.global(?:\.[\w:]+)*?\.v(\d)\.[bfsu](\d+))\b", re.M)
_LOCAL = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:ld|st)\.local[\w.]*)|^\s*\.local\s|__local_depot", re.M)
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)")
_MINNCTAPERSM = re.compile(r"\.minnctapersm\s+(\d+)")


def f64_instructions(ptx: str) -> dict:
    """``{opcode: count}`` of every instruction that works on float64 (arithmetic, conversions, loads...)."""
    out = {}
    for opcode in _F64.findall(ptx):
        out[opcode] = out.get(opcode, 0) + 1
    return out


def vector_accesses(ptx: str) -> list:
    """``[(opcode, "ld" or "st", bits)]`` of the vector global memory accesses."""
    return [(op, kind, int(lanes) * int(bits)) for op, kind, lanes, bits in _VECTOR.findall(ptx)]


def local_memory(ptx: str) -> list:
    """Lines of PTX that touch local memory (arrays that did not become registers)."""
    return [m.group(0).strip() for m in _LOCAL.finditer(ptx)]


def launch_bounds_of(ptx: str):
    """``(maxntid, minnctapersm)`` as the PTX declares them (None where absent)."""
    a, b = _MAXNTID.search(ptx), _MINNCTAPERSM.search(ptx)
    return (int(a.group(1)) if a else None, int(b.group(1)) if b else None)


def readable_name(mangled: str) -> str:
    """``_ZN11fastsoftmax7kernels12cuda_softmax26softmax_fwd_f32_warp_c1024B2v1B...E...`` -> ``fastsoftmax.kernels.cuda_softmax.softmax_fwd_f32_warp_c1024``."""
    if not mangled.startswith("_ZN"):
        return mangled
    s, parts = mangled[3:], []
    while s and s[0].isdigit():
        digits = re.match(r"\d+", s).group()
        n = int(digits)
        parts.append(s[len(digits) : len(digits) + n])
        s = s[len(digits) + n :]
    return ".".join(parts)
