"""ferrox: Rust-powered model merging for PyTorch — task vectors, TIES, DARE,
Model Breadcrumbs, aTLAS and weight matching, streamed checkpoint to
checkpoint — on a core of exact selection, bit packing and a counter-based
RNG that later compression, optimizer and data-importance modules build on.

The heavy lifting happens in ``ferrox._core`` (Rust, GIL released, rayon
threads); the modules here give it a torch-shaped API. Each module mirrors a
file of the Rust core: ``select``, ``pack``, ``philox``, ``ops``, ``cuda``,
``checkpoint``, ``merge``. Submodules are imported on first use, so
``import ferrox`` (and the command line's header-only work) does not import
torch.
"""

import importlib

from . import _core
from ._core import CudaError, InternalError, __version__
from ._runtime import get_num_threads, set_num_threads

_SUBMODULES = ("checkpoint", "cuda", "dtypes", "extract", "importance", "merge", "models", "moe", "ops", "optim", "output", "pack",
               "philox", "select", "synthetic", "testing")

__all__ = ["__version__", "CudaError", "InternalError", "get_num_threads", "set_num_threads", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ferrox' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
