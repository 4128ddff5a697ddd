"""Merging on CUDA: every method's output from ferrox's kernels is bitwise
the CPU merge (the kernels mirror the CPU arithmetic step for step), for
f32/f16/bf16, tie-heavy inputs and tensors spanning several rescale units;
per-row selection too; checkpoint merges with --device cuda equal the
streamed CPU merge. Without a device only the refusals are tested."""

import pytest
import torch

from ferrox import synthetic
from ferrox.merge import METHODS, MergeError, load_state_dict, merge_checkpoints, merge_tensors, parse_config

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


@pytest.mark.gpu
def test_cuda_merge_runs_on_torchs_current_stream():
    base, models = inputs(torch.bfloat16, (1024, 1024), False)
    base, models = base.cuda(), [m.cuda() for m in models]
    want = merge_tensors("ties", base, models, weight=0.5, density=0.3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # queue work ahead of the merge on the side stream
        got = merge_tensors("ties", base, models, weight=0.5, density=0.3)
    side.synchronize()
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_cuda_nonfinite_inputs_are_named(granularity):
    base, models = inputs(torch.float32, (64, 64), False)
    models[1][3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"models\[1\]: non-finite value at flat index 197"):
        merge_tensors("ties", base.cuda(), [m.cuda() for m in models], weight=1.0, density=0.5, granularity=granularity)


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
