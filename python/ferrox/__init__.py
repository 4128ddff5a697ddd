"""ferrox: Rust-powered merging, compression, second-order optimizers and data
importance for PyTorch.

The heavy lifting happens in ``ferrox._core`` (Rust, GIL released, rayon
threads); the modules here give it a torch-shaped API. Each module mirrors a
file of the Rust core: ``select``, ``pack``, ``philox``, ``ops``, ``cuda``,
``checkpoint``.
"""

from . import _core
from ._core import CudaError, InternalError, __version__
from ._runtime import get_num_threads, set_num_threads
from . import checkpoint, cuda, merge, ops, pack, philox, select  # noqa: E402

__all__ = [
    "__version__",
    "CudaError",
    "InternalError",
    "checkpoint",
    "cuda",
    "get_num_threads",
    "merge",
    "ops",
    "pack",
    "philox",
    "select",
    "set_num_threads",
]
