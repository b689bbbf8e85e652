"""Build, cache, load and register the native CPU kernels: every ``*.cc`` in this folder, compiled
into one shared library on first use and registered as XLA FFI targets for the ``cpu`` platform.

    lib = build.load()   # ctypes.CDLL, or None: callers then take their XLA path

Adding a kernel file: put ``foo.cc`` next to ``qmatmul.cc``; nothing here changes.
- Every handler defined with ``XLA_FFI_DEFINE_HANDLER_SYMBOL(name, ...)`` is registered as the FFI
  target ``name`` (the target name is the symbol name), so ``jax.ffi.ffi_call("name", ...)`` works
  once ``load()`` has returned a library. ``TARGETS`` lists what was found.
- The library is built with ``-fvisibility=hidden``. Handlers are exported for you (each file is
  compiled after a generated header that declares them with default visibility); any other
  function Python reads through ctypes needs ``extern "C" __attribute__((visibility("default")))``.
- No ``-march=native``: SIMD code sits in functions with ``__attribute__((target(...)))`` chosen
  at run time with ``__builtin_cpu_supports``, intrinsics behind ``#if defined(__x86_64__)``.
- Files are compiled together, from copies in the build folder (``#include __FILE__`` works; so
  does ``#include "x.h"`` of a header here); one that fails to compile turns every kernel off.

Build: ``$CXX`` or ``c++`` with ``-O3 -std=c++17 -shared -fPIC -fvisibility=hidden
-ffp-contract=off -I <jax.ffi.include_dir()>`` (no implicit FMA contraction: the scalar and SIMD
paths round alike), into a temporary folder, then renamed atomically
to ``$JAXINFER_CACHE/cpu_kernels/<hash>/libjaxinfer_cpu.so`` (JAXINFER_CACHE defaults to
~/.cache/jaxinfer). The hash covers the sources, the compiler path and ``--version``, the flags,
the jaxlib version and the machine, so concurrent processes and machines that share a home folder
each get a matching library. ``JAXINFER_CPU_KERNELS=0`` disables the kernels; no compiler, a
failed build, or a CPU that is not x86-64 with AVX2 leave them off with one logged warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "libjaxinfer_cpu.so"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off")
_HANDLER = re.compile(r"^\s*XLA_FFI_DEFINE_HANDLER_SYMBOL\(\s*(\w+)\s*,", re.MULTILINE)

TARGETS: tuple[str, ...] = ()  # FFI targets registered by load() (the handler symbols found)

_lock = threading.Lock()
_loaded: list = []  # [library or None] once load() has run


def load() -> ctypes.CDLL | None:
    """The kernel library with its FFI targets registered for cpu (built on first use per machine),
    or None where the kernels are off or cannot be built. Cached per process."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def isas(symbol: str, codes: dict[str, int]) -> tuple[str, ...]:
    """The ISA names of ``codes`` (name -> bit; 0 = 'auto') that the library's ``symbol`` (a
    function returning a bit mask of what this host runs) reports, 'auto' first; ('auto',) when
    the kernels are unavailable."""
    lib = load()
    if lib is None:
        return ("auto",)
    mask = getattr(lib, symbol)()
    return ("auto",) + tuple(name for name, code in codes.items() if code and mask & (1 << code))


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc"))


def handlers(texts) -> list[str]:
    """Handler symbols defined in the source ``texts`` (XLA_FFI_DEFINE_HANDLER_SYMBOL's first argument)."""
    names: list[str] = []
    for text in texts:
        names += [name for name in _HANDLER.findall(text.decode()) if name not in names]
    return names


def cache_dir() -> Path:
    # jaxinfer.loader.embedded.cache_dir's rule; importing it would import the loader and the models
    return Path(os.environ.get("JAXINFER_CACHE") or Path.home() / ".cache" / "jaxinfer") / "cpu_kernels"


def _warn(message: str) -> None:
    logger.warning("jaxinfer CPU kernels off (XLA path instead): %s", message)


def _load() -> ctypes.CDLL | None:
    global TARGETS
    if os.environ.get("JAXINFER_CPU_KERNELS", "1") == "0":
        logger.info("jaxinfer CPU kernels disabled by JAXINFER_CPU_KERNELS=0")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _warn(f"they need an x86-64 CPU with AVX2, this is {platform.machine()}")
        return None
    try:
        path, names = _build()
        lib = ctypes.CDLL(str(path))
    except Exception as exc:  # no compiler, compile error, unwritable cache, unloadable library
        _warn(str(exc))
        return None
    if not _host_has_avx2(lib):
        _warn("this CPU lacks AVX2/FMA/F16C")
        return None
    missing = [name for name in names if not hasattr(lib, name)]
    if missing:
        _warn(f"{path} does not export {', '.join(missing)}")
        return None
    import jax

    for name in names:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    TARGETS = tuple(names)
    return lib


def _host_has_avx2(lib: ctypes.CDLL) -> bool:
    return bool(lib.jaxinfer_qmatmul_isas() & (1 << 2))


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "c++"
    found = shutil.which(compiler)
    if found is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r}; set CXX)")
    return found


def _build() -> tuple[Path, list[str]]:
    """The cached library for the current sources (compiled if missing) and its handler names. The
    sources are read once: what is hashed is what is compiled, from copies in the build folder."""
    import jax
    import jaxlib

    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = {path.name: path.read_bytes() for path in sources()}
    headers = {path.name: path.read_bytes() for path in sorted(SOURCE_DIR.glob("*.h"))}
    digest = hashlib.sha256()
    for part in (compiler, version, " ".join(FLAGS), jaxlib.__version__, platform.machine()):
        digest.update(part.encode() + b"\0")
    for name, text in sorted({**texts, **headers}.items()):
        digest.update(name.encode() + b"\0" + text + b"\0")
    names = handlers(texts.values())
    target = cache_dir() / digest.hexdigest()[:16] / LIBRARY_NAME
    if target.is_file():
        return target, names
    target.parent.mkdir(parents=True, exist_ok=True)
    print("jaxinfer: compiling CPU kernels (once per machine) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        exports = Path(tmp) / "exports.h"
        exports.write_text('#include "xla/ffi/api/c_api.h"\n' + "".join(
            f'extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* {name}(XLA_FFI_CallFrame*);\n'
            for name in names))
        compile_flags = [*FLAGS, "-I", jax.ffi.include_dir(), "-I", str(SOURCE_DIR), "-include", str(exports)]
        jobs = []  # one compiler per file, side by side, then one link
        for name, text in texts.items():
            source = Path(tmp) / name
            source.write_bytes(text)
            command = [compiler, *compile_flags, "-c", str(source), "-o", str(source.with_suffix(".o"))]
            jobs.append((name, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        errors = [f"{name}:\n{job.communicate()[1][-4000:]}" for name, job in jobs if job.wait() != 0]
        if errors:
            raise RuntimeError("compiling the CPU kernels failed: " + "\n".join(errors))
        partial = Path(tmp) / LIBRARY_NAME
        objects = [str((Path(tmp) / name).with_suffix(".o")) for name in texts]
        result = subprocess.run([compiler, *FLAGS, *objects, "-o", str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"linking the CPU kernels failed:\n{result.stderr[-4000:]}")
        os.replace(partial, target)  # atomic: a concurrent process sees all or nothing
    return target, names
