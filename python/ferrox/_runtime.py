"""Thread count of ferrox's CPU kernels.

Defaults to torch's intra-op thread count when torch is already imported,
so ferrox and torch do not oversubscribe the cores, and otherwise to the
CPUs this process may run on (``OMP_NUM_THREADS`` when set, as torch reads
it); ``import ferrox`` never imports torch for this. ``FERROX_NUM_THREADS``
overrides both.
"""

import os
import sys

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
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return max(1, torch.get_num_threads())
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Use ``n`` worker threads for ferrox's CPU kernels."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads: expected a positive integer, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


set_num_threads(_default_threads())
