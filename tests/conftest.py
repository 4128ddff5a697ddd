"""Test policy: only tests marked ``gpu`` may skip (when no CUDA device is
present). Any other skip fails the run, so a missing dependency can never
hide behind a silent ``importorskip``."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_bad_skips = []


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _bad_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips:
        print("\nnon-GPU tests were skipped (not allowed):\n  " + "\n  ".join(_bad_skips))
        session.exitstatus = 1


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
