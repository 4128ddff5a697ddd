"""Test policy and shared settings.

Only tests marked ``gpu`` may skip (when no CUDA device is present). Any other
skip fails the run, so a missing dependency can never hide behind a silent
``importorskip``. Under pytest-xdist the verdict is taken on the controller,
which receives every worker's reports.

Hypothesis budgets come from a profile, ``HYPOTHESIS_PROFILE`` = ``ci``
(small: the default when ``CI=true``), ``dev`` (hypothesis's own 100 examples:
the default otherwise) or ``long`` (10x ``dev``). Tests that need a relative
budget scale ``settings.default.max_examples`` in their ``@settings``.

With several xdist workers, each worker gets its share of the cores for torch
and ferrox (one each with ``-n 2`` on 2 cores), so workers do not oversubscribe
the machine; a test that sets thread counts itself starts from the usual
defaults instead.
"""

import inspect
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import ferrox

HAS_CUDA = torch.cuda.is_available()

settings.register_profile("dev", deadline=None)
# CI: a fifth of dev's examples; a failure prints the blob that replays it
# (CI keeps no example database). Generation is slow on a loaded 2-core box.
settings.register_profile("ci", max_examples=20, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
settings.load_profile(PROFILE)

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_DEFAULT_THREADS = (torch.get_num_threads(), ferrox.get_num_threads())
_SHARE = max(1, len(os.sched_getaffinity(0)) // _WORKERS)


def _set_threads(torch_threads, ferrox_threads):
    torch.set_num_threads(torch_threads)
    ferrox.set_num_threads(ferrox_threads)


if _WORKERS > 1:
    _set_threads(_SHARE, _SHARE)
    # Child processes (CLI runs) too, unless a test sets it.
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))


def _sets_threads(item):
    fn = getattr(item, "function", None)
    try:
        return fn is not None and "set_num_threads" in inspect.getsource(fn)
    except (OSError, TypeError):
        return False


@pytest.fixture(autouse=True)
def _worker_threads(request):
    """One share of the cores per worker; a test that manages threads itself
    (it calls set_num_threads, e.g. to compare against one thread) starts
    from the defaults, so its comparison still spans several threads."""
    if _WORKERS > 1 and _sets_threads(request.node):
        _set_threads(*_DEFAULT_THREADS)
    yield
    if _WORKERS > 1:
        _set_threads(_SHARE, _SHARE)


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}; torch/ferrox threads per worker: {_SHARE if _WORKERS > 1 else 'default'}"


# Test files whose module fixtures cost seconds to minutes: with `--dist
# loadgroup` each runs whole on one xdist worker, so its fixture is built
# once; every other test is handed out one by one.
PINNED_FILES = {
    "test_merge_functional.py",  # results: 5 seeds of fine-tuning and merging
    "test_permute.py",  # trained: 6 MLPs trained on digits
    "test_merge_memory.py",  # big_models: 4 x 512 MiB of checkpoints
}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, on the controller
def pytest_xdist_make_scheduler(config, log):
    """loadgroup, with PINNED_FILES as groups. xdist names a group by a
    suffix it writes into item._nodeid, which pytest >= 9 no longer reads
    back, so @pytest.mark.xdist_group alone spreads a group over workers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class PinnedFiles(LoadGroupScheduling):
        def _split_scope(self, nodeid):
            if "@" in nodeid:  # an xdist_group that did get its suffix
                return nodeid.rsplit("@", 1)[-1]
            path = nodeid.split("::", 1)[0]
            return path if os.path.basename(path) in PINNED_FILES else nodeid

    return PinnedFiles(config, log)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


_bad_skips = []
_controller = True  # False in an xdist worker


def pytest_configure(config):
    global _controller
    _controller = not hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    # Runs in each worker and again on the controller for every report a
    # worker forwards: only the controller (or a serial run) keeps count.
    if _controller and report.skipped and not hasattr(report, "wasxfail") and "gpu" not in report.keywords:
        _bad_skips.append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _bad_skips:
        terminalreporter.section("skips that are not allowed", sep="=", red=True, bold=True)
        terminalreporter.write_line("non-GPU tests were skipped (only tests marked gpu may skip):")
        for nodeid in _bad_skips:
            terminalreporter.write_line("  " + nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _controller and _bad_skips and session.exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
