"""Compiling and loading `kosmos2_cpu_kernels`, the C++ extension that holds every CPU kernel of this package (csrc/).

The extension is compiled with `torch.utils.cpp_extension` on first use (about a minute, then cached under
`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`, in a folder of its own per checkout and Python: see
`build_directory`); it needs a C++ compiler and an x86 CPU with AVX2 + FMA.
Where it cannot be had, `kernels()` raises and `unavailable_reason()` says why; a failed compile also says so once in
a warning. `KOSMOS2_CPU_KERNELS=0` in the environment is the one global off switch, read once when this module is
imported: then nothing is compiled and every caller takes its PyTorch path.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

NAME = "kosmos2_cpu_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))  # torch versions an extension by its sources only: their hash goes into a flag
SWITCHED_OFF = os.environ.get("KOSMOS2_CPU_KERNELS", "1") == "0"
_state: dict = {}  # "module" or "error", set by the first kernels() / unavailable_reason()


def kernels():
    """The compiled extension module; raises RuntimeError (with the reason) where it is unavailable."""
    module = _load()
    if module is None:
        raise RuntimeError(f"the kosmos2 CPU kernels are unavailable: {_state['error']}")
    return module


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    """None when the kernels load, else why not (switched off, CPU, compiler error)."""
    _load()
    return _state.get("error")


def has_avx512_bf16() -> bool:
    """Whether the kernels load and can use AVX512-BF16 on this CPU (the VNNI linears and the fused decoding step)."""
    return available() and bool(kernels().has_avx512_bf16())


def _load():
    if "module" in _state or "error" in _state:
        return _state.get("module")
    if SWITCHED_OFF:
        _state["error"] = "switched off by KOSMOS2_CPU_KERNELS=0"
    elif (capability := torch.backends.cpu.get_cpu_capability()) not in ("AVX2", "AVX512"):
        _state["error"] = f"the CPU reports {capability}, the kernels need AVX2 + FMA"
    else:
        try:
            _state["module"] = _compile()
        except Exception as exc:  # no compiler, no Python headers, missing sources, ...: say why, once
            last_line = (str(exc).strip().splitlines() or [""])[-1]
            _state["error"] = f"compiling {NAME} from {CSRC} failed: {type(exc).__name__}: {last_line}"
            warnings.warn(f"{_state['error']}. kosmos2 runs its PyTorch paths instead (slower on CPU); install a C++ "
                          f"compiler (g++) to get the kernels, or set KOSMOS2_CPU_KERNELS=0 to skip them silently.",
                          RuntimeWarning, stacklevel=3)
    return _state.get("module")


def _compile():
    if not SOURCES:
        raise FileNotFoundError(f"no C++ sources in {CSRC} (an installation without the package data?)")
    # cpp_extension warns about a missing CUDA toolkit when imported; irrelevant for a CPU-only extension
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        folder = build_directory()
        if not any(folder.glob(f"{NAME}*.so")):
            print(f"[kosmos2] compiling the CPU kernels ({', '.join(p.name for p in SOURCES)}) once, about a minute; "
                  f"cached in {folder}", file=sys.stderr, flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        headers = hashlib.sha1(b"".join(p.read_bytes() for p in HEADERS)).hexdigest()[:12]
        with environment_ninja_first():
            return cpp_extension.load(name=NAME, sources=[str(p) for p in SOURCES], build_directory=str(folder),
                                      extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", f"-DKOSMOS2_HEADERS={headers}"],
                                      extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def environment_ninja_first():
    """Put this Python's own bin folder (where pip installs `ninja`) first on PATH while building.

    cpp_extension runs the first `ninja` on PATH. `.venv/bin/python` run without the environment activated (train.sh,
    run_gradio.sh) finds the system's ninja, an activated shell finds pip's; two ninja versions keep incompatible
    build logs, so each rebuilt the other's extension from scratch (about a minute, inside a timed run)."""
    bindir = Path(sys.executable).parent
    if not (bindir / "ninja").exists():
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(bindir), *filter(None, [before])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def build_directory(csrc: Path = CSRC, python: str = sys.executable) -> Path:
    """Where the extension is built: `<torch's extensions folder>/kosmos2_cpu_kernels-<key>`, the key a hash of the
    source folder and the Python that builds it.

    torch's own default is one folder per extension name. Its build file names the sources and the include folders by
    absolute path, so two checkouts (or a clean clone with its own `.venv`) sharing that folder rebuilt the extension
    from scratch every time the other one had run (about a minute, inside a timed run). One folder per checkout and
    Python builds once for each."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(cpp_extension.get_default_build_root()) / _torch_tag()
    key = hashlib.sha1(f"{csrc.resolve()}\0{python}".encode()).hexdigest()[:10]
    return Path(root) / f"{NAME}-{key}"


def _torch_tag() -> str:
    """The subfolder torch gives its extensions: Python and CUDA version, e.g. `py311_cu128` (as `_get_build_directory`)."""
    cuda = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    return f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{cuda}"
