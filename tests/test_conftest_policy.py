"""The skip policy of conftest.py holds under pytest-xdist too: a non-gpu
skip fails the run (serial and with 2 workers), a gpu-only skip does not.
Each case runs pytest in a subprocess on a tiny temporary test folder that
uses a copy of this conftest."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

TESTS = '''
import pytest

def test_passes():
    assert True

@pytest.mark.gpu
def test_gpu_only():
    pass  # skipped without CUDA (allowed), passes with it
'''
BAD_SKIP = '''

def test_skips_itself():
    pytest.skip("a missing tool")

@pytest.mark.skip(reason="marked")
def test_marked_skip():
    pass
'''


def run_pytest(folder, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=folder)


def make_folder(root, body):
    root.mkdir()
    shutil.copy(os.path.join(HERE, "conftest.py"), root / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    (root / "test_tiny.py").write_text(body)
    return root


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist-2"])
def test_non_gpu_skip_fails_the_run(tmp_path, workers):
    folder = make_folder(tmp_path / "bad", TESTS + BAD_SKIP)
    r = run_pytest(folder, *workers)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "only tests marked gpu may skip" in r.stdout, r.stdout
    assert "test_skips_itself" in r.stdout and "test_marked_skip" in r.stdout, r.stdout
    assert "failed" not in r.stdout.splitlines()[-1], r.stdout  # nothing failed: the skips alone fail it


def test_gpu_skip_alone_passes_with_workers(tmp_path):
    folder = make_folder(tmp_path / "good", TESTS)
    r = run_pytest(folder, "-n", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout or "1 passed, 1 skipped" in r.stdout, r.stdout
