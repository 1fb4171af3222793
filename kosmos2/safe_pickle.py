"""Load fairseq `.pt` checkpoints without fairseq and without executing pickled code.

A pickle can name any importable callable (`os.system`, `builtins.eval`, ...) and have it called while loading.
`torch.load(weights_only=True)` refuses every non-tensor class, but official checkpoints also pickle fairseq meter
objects (`extra_state.metrics`), omegaconf containers and argparse namespaces. This unpickler allows only tensor
rebuilding and plain containers, turns fairseq/omegaconf/infinibatch/argparse objects into inert `Stub`s (their state is
kept as data; none of their code runs), and refuses everything else with `UnsafeCheckpointError`.
"""
from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


class Stub:
    """Inert stand-in for a pickled object of a class we do not import (fairseq meters, omegaconf nodes, ...)."""

    _qualname = "Stub"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stub of {self._qualname}>"


# Modules whose classes are replaced by stubs: pure data holders in checkpoints, never needed to get the weights.
STUB_MODULE_PREFIXES = ("fairseq.", "fairseq", "omegaconf", "infinibatch", "unilm", "argparse", "torchscale", "apex")

ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "Counter"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"),
    ("torch", "Size"), ("torch", "device"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch.nn.parameter", "Parameter"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Float32DType"), ("numpy.dtypes", "Int64DType"),
    ("copyreg", "_reconstructor"), ("builtins", "object"),
}
TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


def _stub_class(module: str, name: str) -> type:
    return types.new_class(name, (Stub,), exec_body=lambda ns: ns.update(_qualname=f"{module}.{name}"))


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name in TORCH_DTYPES or name.endswith("Storage")):
            return getattr(torch, name)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return getattr(torch.storage, name)
        if module.startswith(STUB_MODULE_PREFIXES):
            return _stub_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint's pickle asks for `{module}.{name}`, which is not a tensor or plain "
            f"container and could run code. Only load checkpoints you trust with torch.load(weights_only=False).")


class _RestrictedPickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler class and `load`."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f, **kwargs):
        return RestrictedUnpickler(f, **kwargs).load()


def safe_torch_load(path: str | Path, map_location="cpu") -> dict:
    """`torch.load` that never runs code from the file (see module docstring)."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, pickle_module=_RestrictedPickleModule,
                          weights_only=False, mmap=True)
    except UnsafeCheckpointError:
        raise
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # Legacy (non-zip) torch files cannot be memory-mapped.
        return torch.load(path, map_location=map_location, pickle_module=_RestrictedPickleModule, weights_only=False)
