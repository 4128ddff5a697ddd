"""Thread count of ferrox's CPU kernels.

Defaults to torch's intra-op thread count so ferrox and torch do not
oversubscribe the cores; ``FERROX_NUM_THREADS`` overrides it.
"""

import os

from . import _core


def _default_threads() -> int:
    env = os.environ.get("FERROX_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"FERROX_NUM_THREADS: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"FERROX_NUM_THREADS: expected a positive integer, got {env!r}")
        return n
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Use ``n`` worker threads for ferrox's CPU kernels."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads: expected a positive integer, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


set_num_threads(_default_threads())
