"""The header parser against the reference: the `safetensors` library.

Mutated copies of files written by ``safetensors.torch.save_file`` are read
by both. Whenever the reference refuses a file (at ``safe_open`` or while
loading any tensor), ferrox must refuse it too, with ValueError/OSError
(never an internal error, never acceptance); whenever ferrox accepts one, the
reference must too, with the same names, dtypes and shapes, and the bytes
ferrox locates for each tensor must be the bytes the reference loads. ferrox
may refuse more (duplicate JSON keys, which the reference resolves by keeping
the last; sub-byte dtypes; dimensions of 2^63 and more)."""

import json
import os
import random
import struct
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from ferrox import _core
from ferrox.checkpoint import read_checkpoint

REFUSED = "refused"

# dtypes the reference knows, with bits per element.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _load_bytes(path, name, framework):
    with safe_open(path, framework) as f:
        t = f.get_tensor(name)
    if framework == "np":
        return np.ascontiguousarray(t).tobytes()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def reference(path):
    """{name: (dtype, shape, bytes)} as the safetensors library reads the
    file, or REFUSED. A tensor loads if numpy or torch can hold it (numpy
    has no bfloat16 or float8, and caps dimensions at 64)."""
    try:
        with safe_open(path, "np") as f:
            names = list(f.keys())
            info = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in names}
    except Exception:
        return REFUSED
    out = {}
    for n in names:
        data = None
        for fw in ("np", "pt"):
            try:
                data = _load_bytes(path, n, fw)
                break
            except Exception:
                continue
        if data is None:
            return REFUSED
        out[n] = info[n] + (data,)
    return out


def ferrox(path):
    """{name: (dtype, shape, bytes at ferrox's offsets)} or REFUSED; any
    exception other than ValueError/OSError propagates and fails the test."""
    try:
        info = read_checkpoint(path)
    except (ValueError, OSError) as e:
        msg = str(e)
        assert "\n" not in msg and os.path.basename(path) in msg, msg
        return REFUSED
    raw = open(path, "rb").read()
    out = {}
    for t in info.tensors:
        assert t.name not in out
        out[t.name] = (t.dtype, t.shape, raw[t.data_start:t.data_start + t.nbytes])
    return out


def compare(path):
    ref, got = reference(path), ferrox(path)
    if ref is REFUSED:
        assert got is REFUSED, f"ferrox accepts what safetensors refuses: {open(path, 'rb').read()[:300]!r}"
    elif got is not REFUSED:
        assert got == ref, open(path, "rb").read()[:300]
    return ref, got


# --- valid files, taken apart ---------------------------------------------------

def base_files(folder):
    g = torch.Generator().manual_seed(0)
    sets = [
        {"a.weight": torch.randn(3, 4, generator=g, dtype=torch.float32),
         "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
         "c": torch.randn(2, 3, generator=g).to(torch.float16)},
        {"idx": torch.arange(6, dtype=torch.int64), "flag": torch.tensor([True, False, True]),
         "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "u": torch.arange(7, dtype=torch.uint8)},
        {"only": torch.randn(8, generator=g, dtype=torch.float64)},
    ]
    paths = []
    for i, s in enumerate(sets):
        p = os.path.join(folder, f"base{i}.safetensors")
        save_file(s, p, metadata={"format": "pt", "note": f"set {i}"} if i != 2 else None)
        paths.append(p)
    return paths


def split(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header, raw[8 + n:]


class RawJSON(str):
    """A value written into the header verbatim."""


def assemble(entries, data, pad=b" ", align=8):
    """entries: (key, value) pairs (so keys may repeat), JSON-encoded in order."""
    enc = lambda v: v if isinstance(v, RawJSON) else json.dumps(v)  # noqa: E731
    body = "{" + ",".join(json.dumps(k) + ":" + enc(v) for k, v in entries) + "}"
    h = body.encode()
    h += pad * (-len(h) % align)
    return struct.pack("<Q", len(h)) + h + data


# --- the mutator -----------------------------------------------------------------

HUGE = [2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]


def mutate_entries(rng, entries, data):
    """One structured change to the header's (key, value) pairs or the data."""
    entries = [(k, v if isinstance(v, RawJSON) else json.loads(json.dumps(v))) for k, v in entries]
    tensors = [i for i, (k, v) in enumerate(entries) if k != "__metadata__" and isinstance(v, dict)]
    if not tensors:
        return entries, data + b"\0"
    i = rng.choice(tensors)
    k, v = entries[i]
    op = rng.randrange(24)
    if op == 0:  # a duplicate key, identical or with changed offsets/shape
        dup = json.loads(json.dumps(v))
        if rng.random() < 0.6:
            end = v["data_offsets"][0]
            dup = {"dtype": v["dtype"], "shape": [0], "data_offsets": [end, end]}
        entries.insert(rng.randrange(len(entries) + 1), (k, dup))
    elif op == 1:  # the duplicate of another tensor's name
        other = entries[rng.choice(tensors)][0]
        entries[i] = (other, v)
    elif op == 2:  # an offset off by one
        j = rng.randrange(2)
        v["data_offsets"][j] += rng.choice([-1, 1])
    elif op == 3:  # shift one tensor (gap or overlap)
        d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        v["data_offsets"] = [x + d for x in v["data_offsets"]]
    elif op == 4:  # swap begin and end
        v["data_offsets"].reverse()
    elif op == 5:  # dtype: another known one, or junk
        v["dtype"] = rng.choice(list(DTYPE_BITS) + ["f32", "Q4", "", "FLOAT32", "F8", "c64"])
    elif op == 6:  # a huge or odd dimension
        shape = v["shape"] or [1]
        shape[rng.randrange(len(shape))] = rng.choice(HUGE + [0, -1, 1.0, "2", None])
        v["shape"] = shape
    elif op == 7:  # add, drop or zero a dimension
        r = rng.random()
        if r < 0.4:
            v["shape"] = v["shape"] + [rng.choice([0, 1, 2])]
        elif r < 0.7 and v["shape"]:
            v["shape"] = v["shape"][:-1]
        else:
            v["shape"] = v["shape"] + [0, rng.choice(HUGE)]
    elif op == 8:  # a field missing, or an extra one
        if rng.random() < 0.5:
            del v[rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            v[rng.choice(["extra", "offsets", "dtype2"])] = rng.choice([1, "x", [0]])
    elif op == 9:  # wrong JSON types
        field = rng.choice(["dtype", "shape", "data_offsets"])
        v[field] = rng.choice([None, 3, "3", [1, 2, 3], {"a": 1}, [0.0, 4.0], [-4, 0]])
    elif op == 10:  # the entry as a list (the reference's serde also takes it)
        entries[i] = (k, [v.get("dtype"), v.get("shape"), v.get("data_offsets")])
    elif op == 11:  # drop a tensor: a gap, or trailing bytes if it was last
        entries.pop(i)
        return entries, data
    elif op == 12:  # metadata of other types
        meta = rng.choice([None, {"n": 1}, {"a": "b", "c": None}, ["x"], "pt", {"nested": {"a": "b"}}, {}])
        entries = [e for e in entries if e[0] != "__metadata__"] + [("__metadata__", meta)]
    elif op == 13:  # metadata twice, or a duplicate key inside it
        if rng.random() < 0.5:
            entries.append(("__metadata__", {"format": "pt"}))
        else:
            entries.append(("__metadata__", RawJSON('{"a":"1","a":"2"}')))
    elif op == 14:  # trailing data bytes
        data = data + bytes(rng.randrange(1, 9))
    elif op == 15:  # data cut short
        data = data[:max(0, len(data) - rng.randrange(1, 9))]
    elif op == 16:  # all offsets shifted (gap at the start)
        d = rng.choice([1, 4, 8])
        for _, vv in entries:
            if isinstance(vv, dict) and "data_offsets" in vv:
                vv["data_offsets"] = [x + d for x in vv["data_offsets"]]
        if rng.random() < 0.5:
            data = bytes(d) + data
    elif op == 17:  # an empty tensor dropped somewhere
        at = rng.choice([0, len(data), len(data) // 2, v["data_offsets"][0], v["data_offsets"][1]])
        entries.append((f"e{rng.randrange(99)}", {"dtype": "F32", "shape": [rng.choice([0, 3]), 0],
                                                   "data_offsets": [at, at]}))
    elif op == 18:  # a tensor name that is not ASCII, or empty
        entries[i] = (rng.choice(["", "ü.weight", "\u2603", "__metadata__x", "a" * 300]), v)
    elif op == 19:  # same bytes, a different dtype of the same total size
        bits = DTYPE_BITS.get(v["dtype"], 8)
        n = (v["data_offsets"][1] - v["data_offsets"][0]) * 8
        for name, b in rng.sample(sorted(DTYPE_BITS.items()), len(DTYPE_BITS)):
            if n % b == 0 and b != bits:
                v["dtype"], v["shape"] = name, [n // b]
                break
    elif op == 20:  # offsets as floats or huge
        v["data_offsets"] = rng.choice([[0.0, 4], [2**64, 2**64], [0, 2**63], [10**30, 0]])
    elif op == 21:  # a tensor copied with the same offsets under a new name
        entries.append((k + ".copy", json.loads(json.dumps(v))))
    elif op == 22:  # two tensors' offsets exchanged
        j = rng.choice(tensors)
        vj = entries[j][1]
        v["data_offsets"], vj["data_offsets"] = vj["data_offsets"], v["data_offsets"]
    # op 23: nothing in the header changes
    return entries, data


def mutate_bytes(rng, raw):
    """One change to the file's bytes: the length field, the header text,
    truncation, appended bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    op = rng.randrange(9)
    if op == 0:
        n2 = rng.choice([n - 1, n + 1, n - 8, n + 8, 0, 1, 7, len(raw), len(raw) - 8, 100_000_001,
                         104_857_600, 2**32 + n, 2**63, 2**64 - 1])
        return struct.pack("<Q", max(0, n2) % 2**64) + raw[8:]
    if op == 1:  # a random byte of the header replaced
        at = 8 + rng.randrange(max(1, n))
        return raw[:at] + bytes([rng.choice([0, 0x22, 0x7B, 0x7D, 0x2C, 0x80, 0xFF, 0xC0, 0x20, 0x30 + rng.randrange(10)])]) + raw[at + 1:]
    if op == 2:  # truncated anywhere
        return raw[:rng.randrange(len(raw))]
    if op == 3:  # header padding replaced by NULs or other whitespace
        h = raw[8:8 + n]
        stripped = h.rstrip(b" ")
        pad = rng.choice([b"\0", b"\n", b"\t", b"\r", b"x", b" "])
        return raw[:8] + stripped + pad * (len(h) - len(stripped)) + raw[8 + n:]
    if op == 4:  # leading whitespace
        h = raw[8:8 + n]
        lead = rng.choice([b" ", b"\n", b"\xef\xbb\xbf", b"\0"])
        return struct.pack("<Q", n + len(lead)) + lead + h + raw[8 + n:]
    if op == 5:  # invalid UTF-8 inside a key
        h = raw[8:8 + n]
        at = h.find(b'"', 1) + 1
        bad = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82"])
        h2 = h[:at] + bad + h[at:]
        return struct.pack("<Q", len(h2)) + h2 + raw[8 + n:]
    if op == 6:  # bytes appended
        return raw + bytes(rng.randrange(1, 17))
    if op == 7:  # a second JSON value after the header
        h = raw[8:8 + n].rstrip(b" ") + b"{}"
        return struct.pack("<Q", len(h)) + h + raw[8 + n:]
    h = raw[8:8 + n]  # the header only, no data
    return struct.pack("<Q", len(h)) + h


def mutated_files(folder, bases, count, seed):
    rng = random.Random(seed)
    parts = [split(p) for p in bases]
    for case in range(count):
        header, data = rng.choice(parts)
        entries = list(header.items())
        rng.shuffle(entries)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            entries, data = mutate_entries(rng, entries, data)
        raw = assemble(entries, data)
        if rng.random() < 0.3:
            raw = mutate_bytes(rng, raw)
        p = os.path.join(folder, f"m{case:04d}.safetensors")
        with open(p, "wb") as f:
            f.write(raw)
        yield p


def test_valid_files_agree(tmp_path):
    for p in base_files(str(tmp_path)):
        ref, got = compare(p)
        assert ref is not REFUSED and got == ref
        # Re-assembled with another key order and padding: still the same.
        header, data = split(p)
        items = list(header.items())[::-1]
        q = str(tmp_path / "re.safetensors")
        open(q, "wb").write(assemble(items, data, pad=b"\n", align=16))
        ref2, got2 = compare(q)
        assert got2 == ref


def test_mutated_headers_against_safetensors(tmp_path):
    bases = base_files(str(tmp_path))
    outcomes = {"both accept": 0, "both refuse": 0, "only ferrox refuses": 0}
    for p in mutated_files(str(tmp_path), bases, 450, seed=1234):
        ref, got = compare(p)
        key = "both refuse" if ref is REFUSED else ("only ferrox refuses" if got is REFUSED else "both accept")
        outcomes[key] += 1
        os.remove(p)
    # The mutator must exercise both sides, or the comparison proves little.
    assert outcomes["both accept"] >= 40 and outcomes["both refuse"] >= 200, outcomes
    # ferrox's extra refusals are few: duplicates, sub-byte dtypes, list entries, dims >= 2^63.
    assert outcomes["only ferrox refuses"] <= 0.15 * 450, outcomes


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "BOOL": 1, "C64": 8}


@st.composite
def near_valid_files(draw):
    """A header whose tensors tile the data section, then perhaps one offset
    or the data length nudged, a dtype swapped or a name repeated: random
    draws land on both sides of every rule, close to the line."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=4))
    entries, end = [], 0
    for n in names:
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = SIZES[dtype]
        for d in shape:
            nbytes *= d
        entries.append([n, {"dtype": dtype, "shape": shape, "data_offsets": [end, end + nbytes]}])
        end += nbytes
    if entries and draw(st.booleans()):
        v = draw(st.sampled_from(entries))[1]
        what = draw(st.sampled_from(["begin", "end", "dtype", "shape"]))
        if what in ("begin", "end"):
            v["data_offsets"][what == "end"] += draw(st.integers(-2, 2))
        elif what == "dtype":
            v["dtype"] = draw(st.sampled_from(sorted(SIZES) + ["F4", "x"]))
        else:
            v["shape"] = v["shape"] + [draw(st.integers(0, 2))]
    entries = draw(st.permutations(entries))
    return [tuple(e) for e in entries], end + draw(st.sampled_from([0, 0, 0, -1, 1, 3]))


@settings(max_examples=settings.default.max_examples * 3 // 2, deadline=None)
@given(case=near_valid_files())
def test_random_headers_against_safetensors(tmp_path_factory, case):
    entries, data_len = case
    p = str(tmp_path_factory.mktemp("hyp") / "r.safetensors")
    with open(p, "wb") as f:
        f.write(assemble(entries, bytes(i % 251 for i in range(max(0, data_len)))))
    compare(p)


# --- the named cases --------------------------------------------------------------

def write(path, header_entries, data):
    with open(path, "wb") as f:
        f.write(assemble(header_entries, data))
    return str(path)


def test_duplicate_key_hiding_a_tensor(tmp_path):
    # The reference keeps the last "v", an empty tensor, so the first "v" and
    # its byte vanish while the file still tiles; ferrox refuses by name.
    p = write(tmp_path / "dup.safetensors", [
        ("w", {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}),
        ("v", {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]}),
        ("v", {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}),
    ], b"\1\2")
    ref = reference(p)
    assert ref is not REFUSED and ref["v"][1] == (0,)
    with pytest.raises(ValueError, match=r'dup\.safetensors.*duplicate key "v"'):
        read_checkpoint(p)


def test_trailing_bytes_and_gaps(tmp_path):
    a = ("a", {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    p = write(tmp_path / "trail.safetensors", [a], bytes(5))
    assert reference(p) is REFUSED
    with pytest.raises(ValueError, match=r"trail\.safetensors.*1 trailing bytes"):
        read_checkpoint(p)
    p = write(tmp_path / "gap.safetensors", [a, ("b", {"dtype": "F32", "shape": [1], "data_offsets": [6, 10]})], bytes(10))
    assert reference(p) is REFUSED
    with pytest.raises(ValueError, match=r'gap\.safetensors.*"b".*gap of 2 bytes'):
        read_checkpoint(p)
    p = write(tmp_path / "lap.safetensors", [a, ("b", {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]})], bytes(6))
    assert reference(p) is REFUSED
    with pytest.raises(ValueError, match=r"lap\.safetensors.*overlap"):
        read_checkpoint(p)


def test_metadata_values_must_be_strings(tmp_path):
    p = write(tmp_path / "meta.safetensors", [("__metadata__", {"total_size": 8})], b"")
    assert reference(p) is REFUSED
    with pytest.raises(ValueError, match=r'meta\.safetensors.*__metadata__\["total_size"\]'):
        read_checkpoint(p)


def _call_with_timeout(fn, fifo, seconds=10.0):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        # Unblock the reader (opening the write end releases a blocked open).
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail(f"blocked on the FIFO {fifo} for {seconds} s")
    return box


@pytest.mark.parametrize("where", ["file", "folder_single", "folder_scan", "index_shard", "index_itself"])
def test_fifo_is_refused_promptly(tmp_path, where):
    ok = [("a", {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]})]
    if where == "file":
        fifo = target = str(tmp_path / "pipe.safetensors")
    elif where == "folder_single":
        fifo, target = str(tmp_path / "model.safetensors"), str(tmp_path)
    elif where == "folder_scan":
        write(tmp_path / "a.safetensors", ok, b"\0")
        fifo, target = str(tmp_path / "b.safetensors"), str(tmp_path)
    else:
        write(tmp_path / "s1.safetensors", ok, b"\0")
        fifo = str(tmp_path / "s2.safetensors")
        index = tmp_path / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
        target = str(tmp_path)
        if where == "index_itself":
            os.remove(index)
            fifo, target = str(index), str(index)
    os.mkfifo(fifo)
    box = _call_with_timeout(lambda: read_checkpoint(target), fifo)
    assert isinstance(box.get("error"), ValueError), box
    assert os.path.basename(fifo) in str(box["error"]) and "FIFO" in str(box["error"])


def test_reader_refuses_a_fifo_promptly(tmp_path):
    fifo = str(tmp_path / "pipe.bin")
    os.mkfifo(fifo)
    box = _call_with_timeout(lambda: _core.read_tensor_into(fifo, 0, bytearray(4)), fifo)
    assert isinstance(box.get("error"), ValueError) and "FIFO" in str(box["error"]), box


def test_devices_and_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="character device"):
        read_checkpoint("/dev/null")
    os.mkdir(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*directory"):
        read_checkpoint(tmp_path)
