"""The shared writer of model folders (``ferrox.output``): outputs that
overlap an input are refused, publishing never replaces what appeared
meanwhile, stale temporaries are cleaned up, every shard says what wrote it."""

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import ferrox
from ferrox import output
from ferrox.checkpoint import read_checkpoint
from ferrox.output import OutputFolder, PlannedTensor


def tree_digest(path) -> dict:
    """Every file under ``path`` (or the file itself) with its bytes' hash."""
    path = str(path)
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not really weights")
    (folder / "config.json").write_text("{}")
    return folder


def write_one(dest: OutputFolder, name="w", values=None):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) if values is None else values
    w = dest.writer([PlannedTensor(name, "F32", values.shape, values.nbytes)], 1 << 30)
    w.write(name, values)


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("where", ["same", "inside", "contains", "file", "config", "symlink", "inside-symlink"])
def test_outputs_overlapping_an_input_are_refused_before_anything_is_written(tmp_path, model, where, force):
    cfg = tmp_path / "merge.yml"
    cfg.write_text("merge_method: linear\n")
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    out = {"same": model, "inside": model / "sub", "contains": tmp_path, "file": model / "model.safetensors",
           "config": cfg, "symlink": link, "inside-symlink": link / "merged"}[where]
    before = {p: tree_digest(p) for p in (model, cfg)}
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="refusing"):
        with OutputFolder(out, fmt="merge", inputs=[model, cfg], force=force) as dest:
            write_one(dest)
    assert {p: tree_digest(p) for p in (model, cfg)} == before
    assert sorted(os.listdir(tmp_path)) == listing and sorted(os.listdir(model)) == ["config.json", "model.safetensors"]


def test_an_output_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while this run was writing") as e:
        with OutputFolder(out, fmt="merge") as dest:
            write_one(dest)
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert os.listdir(out) == ["theirs.txt"]
    assert e.value.output_state == f"nothing was written to {out}"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_two_writers_to_one_output_only_the_first_publishes(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(out, fmt="merge").__enter__()
    second = OutputFolder(out, fmt="merge").__enter__()
    assert first.path != second.path
    write_one(first)
    write_one(second, values=np.full((2, 3), 2, np.float32))
    first.__exit__(None, None, None)
    with pytest.raises(FileExistsError, match="appeared"):
        second.__exit__(None, None, None)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.get_tensor("w").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_stale_temporaries_of_dead_processes_are_removed_and_reported(tmp_path):
    out = tmp_path / "out"
    stale_dir = tmp_path / f".out.ferrox-tmp-{dead_pid()}"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 1000)
    stale_old = tmp_path / f".out.ferrox-old-{dead_pid()}.ab12"
    stale_old.write_text("a file replaced by --force")
    live = tmp_path / f".out.ferrox-tmp-{os.getppid()}.cd34"  # a process that is alive
    live.mkdir()
    other = tmp_path / f".other.ferrox-tmp-{dead_pid()}"  # another output's
    other.mkdir()
    notices = []
    with OutputFolder(out, fmt="merge", notice=notices.append) as dest:
        write_one(dest)
    assert not stale_dir.exists() and not stale_old.exists() and live.exists() and other.exists()
    assert len(notices) == 2 and all("earlier run" in n and "did not finish" in n for n in notices)
    assert any(str(stale_dir) in n for n in notices)


@pytest.mark.parametrize("kind", ["file", "symlink", "folder"])
def test_force_replaces_files_and_symlinks_without_leftovers(tmp_path, kind):
    out = tmp_path / "out"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("the link's target is not touched")
    if kind == "file":
        out.write_text("old")
    elif kind == "symlink":
        out.symlink_to(target, target_is_directory=True)
    else:
        out.mkdir()
        (out / "old.txt").write_text("old")
    with OutputFolder(out, fmt="merge", force=True) as dest:
        write_one(dest)
    assert out.is_dir() and not out.is_symlink() and sorted(os.listdir(out)) == ["model.safetensors"]
    assert (target / "keep.txt").read_text() == "the link's target is not touched"
    assert sorted(os.listdir(tmp_path)) == ["out", "target"]


def test_existing_output_needs_force_and_states_what_is_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        OutputFolder(out, fmt="merge").__enter__()
    with pytest.raises(KeyboardInterrupt) as e:
        with OutputFolder(out, fmt="merge", force=True) as dest:
            write_one(dest)
            raise KeyboardInterrupt
    assert e.value.output_state == f"{out} was left as it was" and os.listdir(out) == []
    with pytest.raises(KeyboardInterrupt) as e:
        with OutputFolder(tmp_path / "new", fmt="merge") as dest:
            raise KeyboardInterrupt
    assert e.value.output_state == f"nothing was written to {tmp_path / 'new'}"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_every_shard_records_format_and_version_and_the_report_is_read_back(tmp_path):
    out = tmp_path / "out"
    planned = [PlannedTensor(f"t{i}", "F32", (10,), 40) for i in range(5)]
    with OutputFolder(out, fmt="bitdelta") as dest:
        w = dest.writer(planned, 100, metadata={"ferrox_method": "demo"})
        for p in planned:
            w.write(p.name, np.full(10, float(p.name[1:]), np.float32))
        dest.write_report({"ratio": 15.9}, {"t0": {"alpha": 0.5}})
    info = read_checkpoint(out)
    assert len(info.files) == 3
    for f in info.files:
        assert info.metadata[f]["ferrox_format"] == "bitdelta"
        assert info.metadata[f]["ferrox_version"] == ferrox.__version__
        assert info.metadata[f]["ferrox_method"] == "demo"
    report = output.read_report(out)
    assert report["summary"] == {"ratio": 15.9} and report["tensors"] == {"t0": {"alpha": 0.5}}
    assert report["ferrox_format"] == "bitdelta"
    for i, t in enumerate(info.tensors):
        with safe_open(t.file, "np") as f:
            assert f.get_tensor(t.name).tolist() == [float(i)] * 10


def test_writer_refuses_bytes_that_overrun_a_tensor(tmp_path):
    with pytest.raises(ValueError, match="overrun"):
        with OutputFolder(tmp_path / "out", fmt="merge") as dest:
            w = dest.writer([PlannedTensor("w", "F32", (2,), 8)], 1 << 20)
            w.write_bytes("w", b"\0" * 8, at=4)
    with pytest.raises(ValueError, match="planned F32"):
        with OutputFolder(tmp_path / "out", fmt="merge") as dest:
            w = dest.writer([PlannedTensor("w", "F32", (2,), 8)], 1 << 20)
            w.write("w", np.zeros(2, np.float64))
    assert os.listdir(tmp_path) == []


_HUP_WRITER = r"""
import sys, time
from ferrox.output import OutputFolder
from ferrox.cli import _common

def run(args):
    with OutputFolder(sys.argv[1], fmt="merge") as dest:
        open(dest.path + "/big.bin", "wb").write(b"x" * 4096)
        print("writing", flush=True)
        time.sleep(60)
    return 0

class A: pass
a = A(); a.run = run; a.command_name = "test"
sys.exit(_common.run_command(a))
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGTERM", "SIGKILL"])
def test_signals_leave_nothing_behind_or_the_next_run_cleans_up(tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HUP_WRITER, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    left = [p for p in os.listdir(tmp_path) if "ferrox" in p]
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and len(left) == 1  # nothing can run on SIGKILL
        notices = []
        with OutputFolder(out, fmt="merge", notice=notices.append) as dest:
            write_one(dest)
        assert len(notices) == 1 and left[0] in notices[0]
        assert sorted(os.listdir(tmp_path)) == ["out"]
    else:
        assert proc.returncode == 130, err
        assert f"interrupted (signal {sig}); nothing was written to {out}" in err and "Traceback" not in err
        assert left == [] and not out.exists()


def test_report_must_be_json_serialisable_without_nan(tmp_path):
    with pytest.raises(ValueError):
        with OutputFolder(tmp_path / "out", fmt="merge") as dest:
            dest.write_report({"x": float("nan")}, {})
    assert os.listdir(tmp_path) == []
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / output.REPORT_FILE).write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        output.read_report(tmp_path / "bad")


def test_copy_moves_any_dtype_bit_for_bit_in_steps_and_metadata_patches_in_place(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "src.safetensors"
    values = {"ids": np.arange(-50, 51, dtype=np.int64), "flags": np.array([True, False, True]),
              "h": np.frombuffer(np.random.default_rng(0).bytes(2 * 33), dtype=np.float16)}
    save_file(values, str(src))
    entries = {t.name: t for t in read_checkpoint(src).tensors}
    planned = [PlannedTensor(n, e.dtype, e.shape, e.nbytes) for n, e in entries.items()]
    with OutputFolder(tmp_path / "out", fmt="merge") as dest:
        w = dest.writer(planned, 1 << 20, metadata={"ferrox_hash": "?" * 16})
        for n, e in entries.items():
            w.copy(n, e, step=7)  # steps that split elements
        w.patch_metadata("ferrox_hash", "0123456789abcdef")
        with pytest.raises(ValueError, match="grew"):
            w.patch_metadata("ferrox_hash", "0123456789abcdef-longer")
    info = read_checkpoint(tmp_path / "out")
    assert info.metadata[info.files[0]]["ferrox_hash"] == "0123456789abcdef"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        for n, v in values.items():
            assert f.get_tensor(n).tobytes() == v.tobytes(), n
