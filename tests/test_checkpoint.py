"""Checkpoint headers: the embedded MiniLM, sharded folders, corrupt files."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ferrox.checkpoint import read_checkpoint
from ferrox.models import default_model_path

MINILM = os.path.join(default_model_path(), "model.safetensors")


def reference_entries(path):
    with safe_open(path, "pt") as f:
        out = {}
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        return out


def test_minilm_matches_safetensors_library():
    info = read_checkpoint(MINILM)
    ref = reference_entries(MINILM)
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == ref
    assert 22_000_000 < info.total_params < 23_000_000
    size = {"F32": 4, "I64": 8}
    assert info.total_bytes == sum(t.numel * size[t.dtype] for t in info.tensors)
    assert os.path.getsize(MINILM) > info.total_bytes
    assert info.index is None and len(info.files) == 1


def test_folder_and_file_agree():
    a = read_checkpoint(default_model_path())
    b = read_checkpoint(MINILM)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]


def make_sharded(tmp_path, tensors, shards=3):
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tmp_path


def sample_tensors():
    return {
        "a.weight": torch.randn(3, 4, dtype=torch.bfloat16),
        "b.weight": torch.randn(5, dtype=torch.float16),
        "c.bias": torch.zeros(2, 2, 2),
        "d.idx": torch.arange(6, dtype=torch.int64),
        "e.scalar": torch.tensor(1.5),
    }


def test_sharded_folder(tmp_path):
    tensors = sample_tensors()
    make_sharded(tmp_path, tensors)
    info = read_checkpoint(tmp_path)
    assert info.index.endswith("model.safetensors.index.json")
    assert len(info.files) == 3
    got = {t.name: (t.dtype, t.shape, t.nbytes) for t in info.tensors}
    dt = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    assert got == {n: (dt[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()}


def test_sharded_index_naming_missing_tensor(tmp_path):
    make_sharded(tmp_path, sample_tensors())
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="ghost.weight"):
        read_checkpoint(tmp_path)


def test_sharded_index_naming_missing_shard(tmp_path):
    make_sharded(tmp_path, sample_tensors())
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises((ValueError, OSError), match="model-00002-of-00003"):
        read_checkpoint(tmp_path)


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        read_checkpoint("/nonexistent/model.safetensors")


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no safetensors"):
        read_checkpoint(tmp_path)


def write_raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "header,data,match",
    [
        (b"{not json", b"", "model.safetensors"),
        (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), b"\0" * 4, "w"),
        (json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"\0" * 8, "w"),
        (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode(), b"\0" * 8, "w"),
        (json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode(), b"\0" * 8, "w"),
    ],
)
def test_corrupt_files_name_file_and_tensor(tmp_path, header, data, match):
    p = write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=match) as info:
        read_checkpoint(p)
    assert "model.safetensors" in str(info.value)


def test_truncated_file(tmp_path):
    save_file(sample_tensors(), str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[: len(raw) - 3])
    with pytest.raises(ValueError, match="m.safetensors"):
        read_checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes(raw[:5])
    with pytest.raises(ValueError, match="m.safetensors"):
        read_checkpoint(tmp_path / "m.safetensors")


def test_huge_declared_header_is_refused(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="h.safetensors"):
        read_checkpoint(p)


# --- the Rust reader of tensor bytes (_core.read_tensor_into) ------------------

def test_read_tensor_into_matches_the_file(tmp_path):
    import numpy as np

    from ferrox import _core

    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    for t in read_checkpoint(tmp_path / "m.safetensors").tensors:
        want = raw[t.data_start:t.data_start + t.nbytes]
        buf = bytearray(t.nbytes)
        assert _core.read_tensor_into(t.file, t.data_start, buf) is None
        assert bytes(buf) == want
        ref = tensors[t.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert bytes(buf) == ref, t.name
        # numpy arrays of another dtype and memoryview slices are filled the same way.
        arr = np.zeros(t.nbytes, dtype=np.uint8)
        _core.read_tensor_into(t.file, t.data_start, arr, name=t.name)
        assert arr.tobytes() == want
        big = bytearray(t.nbytes + 6)
        _core.read_tensor_into(t.file, t.data_start, memoryview(big)[3:3 + t.nbytes])
        assert bytes(big) == b"\0" * 3 + want + b"\0" * 3
    f32 = np.zeros((2, 2), dtype=np.float32)
    _core.read_tensor_into(str(tmp_path / "m.safetensors"), 0, f32)
    assert f32.tobytes() == raw[:16]
    # A torch tensor's storage through its numpy view.
    t = torch.zeros(5, dtype=torch.bfloat16)
    _core.read_tensor_into(str(tmp_path / "m.safetensors"), 8, t.view(torch.uint8).numpy())
    assert t.view(torch.uint8).numpy().tobytes() == raw[8:18]


def test_read_tensor_into_errors(tmp_path):
    import numpy as np

    from ferrox import _core

    p = tmp_path / "short.bin"
    p.write_bytes(bytes(range(10)))
    with pytest.raises(ValueError, match=r'short\.bin.*truncated.*"w"') as e:
        _core.read_tensor_into(str(p), 8, bytearray(4), name="w")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="short.bin"):
        _core.read_tensor_into(str(p), 2**64 - 2, bytearray(4))
    with pytest.raises(OverflowError):
        _core.read_tensor_into(str(p), -1, bytearray(4))
    with pytest.raises(OSError, match="missing.bin"):
        _core.read_tensor_into(str(tmp_path / "missing.bin"), 0, bytearray(1))
    with pytest.raises(ValueError, match="directory"):
        _core.read_tensor_into(str(tmp_path), 0, bytearray(1))
    with pytest.raises(ValueError, match="read-only"):
        _core.read_tensor_into(str(p), 0, b"abcd")
    ro = np.zeros(4, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _core.read_tensor_into(str(p), 0, ro)
    with pytest.raises(ValueError, match="non-contiguous"):
        _core.read_tensor_into(str(p), 0, np.zeros(8, dtype=np.uint8)[::2])
    with pytest.raises(TypeError, match="buffer"):
        _core.read_tensor_into(str(p), 0, [0, 0])
    # Nothing to read is fine, even at the end of the file.
    _core.read_tensor_into(str(p), 10, bytearray(0))
    # The buffer cannot be resized under the read: the export is released after.
    buf = bytearray(4)
    _core.read_tensor_into(str(p), 6, buf)
    assert bytes(buf) == bytes([6, 7, 8, 9])
    buf.extend(b"x")  # no view left behind


def test_read_tensor_into_from_threads(tmp_path):
    """Concurrent reads (the GIL is released during each) fill each buffer right."""
    import threading

    from ferrox import _core

    p = tmp_path / "big.bin"
    data = os.urandom(1 << 22)
    p.write_bytes(data)
    out, errors = [bytearray(1 << 20) for _ in range(4)], []

    def work(i):
        try:
            _core.read_tensor_into(str(p), i << 20, out[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and b"".join(out) == data
