"""The bridge's contract: threads, GIL release, panics, error classes."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import ferrox


def _run(code, **env):
    full = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_thread_count_follows_torch_by_default():
    env = {k: v for k, v in os.environ.items() if k != "FERROX_NUM_THREADS"}
    code = "import torch; torch.set_num_threads(1); import ferrox; print(ferrox.get_num_threads(), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout.split()
    assert ours == theirs == "1"


def test_thread_count_env_override():
    assert _run("import ferrox; print(ferrox.get_num_threads())", FERROX_NUM_THREADS="3") == "3"


def test_thread_count_env_invalid():
    env = dict(os.environ, FERROX_NUM_THREADS="zero")
    out = subprocess.run([sys.executable, "-c", "import ferrox"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FERROX_NUM_THREADS" in out.stderr


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="num_threads"):
        ferrox.set_num_threads(0)
    n = ferrox.get_num_threads()
    ferrox.set_num_threads(2)
    assert ferrox.get_num_threads() == 2
    ferrox.set_num_threads(n)


def test_panic_becomes_ordinary_exception():
    with pytest.raises(ferrox.InternalError, match="deliberate") as info:
        ferrox._core._debug_panic("deliberate test panic")
    assert isinstance(info.value, Exception) and isinstance(info.value, RuntimeError)
    # The process is still healthy afterwards.
    x = torch.ones(4)
    assert ferrox.ops.axpby(torch.empty(4), 1.0, x, 1.0, x).tolist() == [2.0] * 4


def test_gil_released_during_compute():
    """A second Python thread keeps running while ferrox computes."""
    x = torch.randn(20_000_000)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.02)
    start = time.perf_counter()
    for _ in range(5):
        ferrox.select.kth_largest_abs(x, 1000)
    end = time.perf_counter()
    stop.set()
    t.join()
    during = [s for s in ticks if start <= s <= end]
    # With the GIL held, the ticker could not run at all during the calls.
    assert len(during) >= max(3, int((end - start) / 0.001) // 10)


def test_error_classes_and_messages():
    x = torch.ones(4)
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got list"):
        ferrox.ops.axpby(torch.empty(4), 1.0, [1, 2, 3, 4], 1.0, x)
    with pytest.raises(TypeError, match=r"y: dtype float16 does not match out \(float32\)"):
        ferrox.ops.axpby(torch.empty(4), 1.0, x, 1.0, x.half())
    with pytest.raises(ValueError, match=r"y: shape \[5\] does not match out shape \[4\]"):
        ferrox.ops.axpby(torch.empty(4), 1.0, x, 1.0, torch.ones(5))
    with pytest.raises(TypeError, match=r"out: expected dtype float32 or float16 or bfloat16, got int32"):
        ferrox.ops.axpby(torch.empty(4, dtype=torch.int32), 1.0, x.int(), 1.0, x.int())
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        ferrox.ops.axpby(torch.empty(4, dtype=torch.float64), 1.0, x.double(), 1.0, x.double())
