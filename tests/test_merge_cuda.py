"""Merging on CUDA: every method's output from ferrox's kernels is bitwise
the CPU merge (the kernels mirror the CPU arithmetic step for step), for
f32/f16/bf16, tie-heavy inputs and tensors spanning several rescale units;
per-row selection too; checkpoint merges with --device cuda equal the
streamed CPU merge. The merge is ordered on torch's current stream (inputs
written there after a sleep), waits for no other stream, takes its scratch
from torch's allocator (OutOfMemoryError under pressure), handles tensors of
more than 2^31 elements, strided and offset inputs, and two threads on two
streams. Without a device only the refusals are tested."""

import pytest
import torch

from ferrox import synthetic
from ferrox.merge import MergeError, load_state_dict, merge_checkpoints, merge_tensors, parse_config
from ferrox.merge.methods import GENERALIZED as METHODS  # the methods the Rust core runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(dtype, shape, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    levels = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, -1.0, 1.0])
    models = []
    for _ in range(3):
        noise = levels[torch.randint(0, 7, shape, generator=g)] if ties else 0.05 * torch.randn(shape, generator=g)
        models.append((base.float() + noise).to(dtype))
    return base, models


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("ties,shape", [(False, (257, 129)), (True, (3, 70001))])
def test_cuda_merge_is_bitwise_the_cpu_merge(method, dtype, ties, shape):
    base, models = inputs(dtype, shape, ties)
    kw = dict(weight=[0.5, 0.3, 0.8], density=0.4, gamma=0.02, lam=0.9, seed=7, tensor_name="layer.w")
    cpu = merge_tensors(method, base, models, **kw)
    gpu = merge_tensors(method, base.cuda(), [m.cuda() for m in models], **kw)
    assert gpu.device.type == "cuda"
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(gpu.cpu().view(bits), cpu.view(bits))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties"])
@pytest.mark.parametrize("ties,shape", [(False, (300, 257)), (True, (40, 4099)), (True, (5000, 3))])
def test_cuda_row_merge_is_bitwise_the_cpu_merge(method, dtype, ties, shape):
    base, models = inputs(dtype, shape, ties, seed=1)
    kw = dict(weight=[0.5, 0.3, 0.8], density=0.4, gamma=0.05, seed=3, tensor_name="mlp.w", granularity="row")
    cpu = merge_tensors(method, base, models, **kw)
    gpu = merge_tensors(method, base.cuda(), [m.cuda() for m in models], **kw)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(gpu.cpu().view(bits), cpu.view(bits))


def bits_of(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


TIES = dict(weight=[0.5, 0.3, 0.8], density=0.3, lam=0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_cuda_merge_is_ordered_after_inputs_written_on_a_side_stream(granularity):
    # The inputs hold NaN until copies queued on the side stream behind a long
    # sleep overwrite them; the merge is queued on that stream right after.
    # Anything the merge ran elsewhere (the legacy stream, a host wait before
    # its kernels were queued) would see NaN or stale scratch.
    base, models = inputs(torch.bfloat16, (1024, 1024), True, seed=4)
    want = merge_tensors("ties", base, models, granularity=granularity, **TIES)
    dev = [torch.full(base.shape, float("nan"), dtype=base.dtype, device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    host = [t.pin_memory() for t in [base] + models]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        for d, h in zip(dev, host):
            d.copy_(h, non_blocking=True)
        got = merge_tensors("ties", dev[0], dev[1:], granularity=granularity, **TIES)
    side.synchronize()
    assert torch.equal(bits_of(got.cpu()), bits_of(want))


@pytest.mark.gpu
def test_cuda_merge_does_not_wait_for_other_streams():
    # Another thread keeps the legacy default stream busy; a merge on a side
    # stream must neither wait for it (its one host wait is on its own
    # stream) nor be disturbed by it.
    import threading

    base, models = inputs(torch.float32, (512, 777), True, seed=5)
    want = merge_tensors("breadcrumbs_ties", base, models, gamma=0.02, **TIES)
    base_d, models_d = base.cuda(), [m.cuda() for m in models]
    # Warm up first: loading the kernels (NVRTC, cuModuleLoadData) may
    # synchronise the device, which is not what this test is about.
    merge_tensors("breadcrumbs_ties", base_d, models_d, gamma=0.02, **TIES)
    torch.cuda.synchronize()
    busy = torch.cuda.Event()
    queued = threading.Event()

    def hog():
        with torch.cuda.stream(torch.cuda.default_stream()):
            torch.cuda._sleep(3_000_000_000)  # seconds of spinning on the default stream
            busy.record()
        queued.set()

    t = threading.Thread(target=hog)
    t.start()
    queued.wait()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = merge_tensors("breadcrumbs_ties", base_d, models_d, gamma=0.02, **TIES)
    still_busy = not busy.query()
    side.synchronize()
    t.join()
    torch.cuda.synchronize()
    assert torch.equal(bits_of(got.cpu()), bits_of(want))
    assert still_busy, "the merge returned only after the default stream's work finished"


@pytest.mark.gpu
def test_two_threads_merge_on_two_streams():
    import threading

    cases = [inputs(dt, (300, 1001), True, seed=s) for s, dt in [(6, torch.bfloat16), (7, torch.float16)]]
    wants = [[merge_tensors(m, b, ms, granularity=g, **TIES) for m in ("ties", "dare_ties") for g in ("tensor", "row")]
             for b, ms in cases]
    results, errors = [None, None], []

    def work(i):
        try:
            b, ms = cases[i]
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                bd, msd = b.cuda(), [m.cuda() for m in ms]
                outs = []
                for _ in range(3):
                    outs = [merge_tensors(m, bd, msd, granularity=g, **TIES)
                            for m in ("ties", "dare_ties") for g in ("tensor", "row")]
                results[i] = [o.cpu() for o in outs]
        except Exception as e:  # reported below, with the thread
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, wants):
        for g, w in zip(got, want):
            assert torch.equal(bits_of(g), bits_of(w))


@pytest.mark.gpu
def test_cuda_merge_takes_strided_and_offset_inputs():
    base, models = inputs(torch.bfloat16, (257, 300), True, seed=8)
    want = merge_tensors("breadcrumbs_ties", base, models, gamma=0.05, granularity="row", **TIES)
    # base is a view one element into a larger buffer (x[1:]); the models are
    # transposed copies viewed back (non-contiguous).
    flat = torch.empty(base.numel() + 1, dtype=base.dtype, device="cuda")
    flat[1:] = base.reshape(-1).cuda()
    base_d = flat[1:].view(base.shape)
    assert base_d.storage_offset() == 1
    models_d = [m.t().contiguous().cuda().t() for m in models]
    assert not models_d[0].is_contiguous()
    got = merge_tensors("breadcrumbs_ties", base_d, models_d, gamma=0.05, granularity="row", **TIES)
    assert torch.equal(bits_of(got.cpu()), bits_of(want))


@pytest.mark.gpu
def test_cuda_workspace_comes_from_torchs_allocator():
    shape = (4096, 4096)
    base, models = inputs(torch.bfloat16, shape, True, seed=9)
    base_d, models_d = base.cuda(), [m.cuda() for m in models]
    out = torch.empty_like(base_d)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    merge_tensors("ties", base_d, models_d, out=out, **TIES)
    peak = torch.cuda.max_memory_allocated() - before
    # Three keep masks of one byte per element at least, seen by torch, and
    # given back when the merge returns.
    assert peak >= 3 * base.numel(), peak
    assert torch.cuda.memory_allocated() == before
    assert torch.equal(bits_of(out.cpu()), bits_of(merge_tensors("ties", base, models, **TIES)))


@pytest.mark.gpu
def test_cuda_merge_under_memory_pressure_raises_torchs_out_of_memory():
    shape = (8192, 8192)
    base, models = inputs(torch.bfloat16, shape, True, seed=10)
    base_d, models_d = base.cuda(), [m.cuda() for m in models]
    out = torch.empty_like(base_d)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    # Leave less than the three masks (192 MiB) free: the workspace cannot fit.
    hog = torch.empty(free - 64 * 2**20, dtype=torch.uint8, device="cuda")
    with pytest.raises(torch.OutOfMemoryError):
        merge_tensors("ties", base_d, models_d, out=out, **TIES)
    del hog
    torch.cuda.empty_cache()
    merge_tensors("ties", base_d, models_d, out=out, **TIES)
    assert torch.equal(bits_of(out.cpu()), bits_of(merge_tensors("ties", base, models, **TIES)))


@pytest.mark.gpu
def test_cuda_merge_of_more_than_2_31_elements():
    n = 2**31 + 4099
    need = 4 * 2 * n + 2 * n + 2**30  # base, 2 models, out (bf16), 2 masks, slack
    total = torch.cuda.get_device_properties(0).total_memory
    assert total >= need, f"this test needs {need / 2**30:.1f} GiB of GPU memory, the device has {total / 2**30:.1f}"
    g = torch.Generator(device="cuda").manual_seed(11)
    base = torch.randn(n, generator=g, device="cuda").to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(n, generator=g, device="cuda")).to(torch.bfloat16) for _ in range(2)]
    kw = dict(weight=[0.6, 0.4], density=0.2, lam=1.0)
    got = merge_tensors("ties", base, models, **kw).cpu()
    want = merge_tensors("ties", base.cpu(), [m.cpu() for m in models], **kw)
    assert torch.equal(bits_of(got), bits_of(want))
    # Elements past 2^31 were merged, not left as the base.
    tail = slice(2**31, n)
    assert not torch.equal(bits_of(got[tail]), bits_of(base[tail].cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_cuda_nonfinite_inputs_are_named(granularity):
    base, models = inputs(torch.float32, (64, 64), False)
    models[1][3, 5] = float("inf")
    with pytest.raises(ValueError) as cpu:
        merge_tensors("ties", base, models, weight=1.0, density=0.5, granularity=granularity)
    assert str(cpu.value) == "models[1]: non-finite value inf at flat index 197"
    out = torch.full(base.shape, 7.0, device="cuda")
    with pytest.raises(ValueError) as gpu:
        merge_tensors("ties", base.cuda(), [m.cuda() for m in models], weight=1.0, density=0.5,
                      granularity=granularity, out=out)
    assert str(gpu.value) == str(cpu.value)
    assert bool((out == 7.0).all()), "a failed merge leaves out as it was"


@pytest.mark.gpu
@pytest.mark.parametrize("method,granularity", [("task_arithmetic", "tensor"), ("ties", "tensor"),
                                                ("breadcrumbs_ties", "tensor"), ("dare_linear", "tensor"),
                                                ("breadcrumbs", "row"), ("ties", "row")])
def test_checkpoint_merge_on_cuda_equals_cpu(tmp_path, method, granularity):
    base = synthetic.make_llama(tmp_path / "base", hidden=64, layers=2)
    fts = [synthetic.fine_tune(base, tmp_path / f"ft{i}", seed=i + 1) for i in range(3)]
    raw = {"merge_method": method, "base_model": str(base), "parameters": {"granularity": granularity},
           "models": [{"model": str(f), "parameters": {"weight": 0.4, "density": 0.5}} for f in fts]}
    merge_checkpoints(parse_config(raw), tmp_path / "cpu", progress=False)
    merge_checkpoints(parse_config(raw), tmp_path / "gpu", progress=False, device="cuda")
    cpu, gpu = load_state_dict(tmp_path / "cpu"), load_state_dict(tmp_path / "gpu")
    for name in cpu:
        assert torch.equal(cpu[name].view(torch.int16), gpu[name].view(torch.int16)), name


def test_device_cuda_refusals_are_clear(tmp_path):
    base = synthetic.make_llama(tmp_path / "base", hidden=32, layers=1)
    ft = synthetic.fine_tune(base, tmp_path / "ft", seed=1)
    raw = {"merge_method": "breadcrumbs", "base_model": str(base),
           "models": [{"model": str(ft), "parameters": {"weight": 1.0}}]}
    if torch.cuda.is_available():
        expected, device = "cuda:99 does not exist", "cuda:99"
    else:
        expected, device = "torch sees no CUDA device", "cuda"
    with pytest.raises(MergeError, match=expected):
        merge_checkpoints(parse_config(raw), tmp_path / "out", device=device)
    with pytest.raises(MergeError, match="expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        merge_checkpoints(parse_config(raw), tmp_path / "out", device="gpu")
    assert not (tmp_path / "out").exists()
