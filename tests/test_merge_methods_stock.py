"""nearswap and model_stock: parity with mergekit 0.1.5 on float32
Llama-layout checkpoints (nearswap bit for bit; model_stock, whose t the Rust
core takes from float64 sums, within the bound stated in
mergekit_parity.check_model_stock), naive float64 references, edge cases
(t = 0 and large t give the inputs, the singular Model Stock denominator
keeps the base), bf16 inputs, parameter checks; and the registry's extension
point: a method registered from outside merges through config, checkpoint
streaming and ``merge_tensors`` with no other code."""

import numpy as np
import pytest
import torch

from ferrox.merge import ConfigError, merge_tensors, parse_config
from ferrox.merge.methods import METHODS, Param, TensorMethod, register
import mergekit_parity
from ferrox.merge.methods.model_stock import model_stock
from methods_helpers import assert_bitwise, config, fx_merge, load_folder, make_models, run_mergekit

pytest.importorskip("mergekit")  # a test dependency; pinned to 0.1.5 in the venv


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    base, fts = make_models(root)
    return root, base, fts


def cases(base, fts):
    return {
        "nearswap": config("nearswap", base, [base, fts[0]], {"t": 0.001}),
        "nearswap_wide": config("nearswap", base, [fts[1]], {"t": 0.01}),
        "model_stock": config("model_stock", base, fts),
        "model_stock_two": config("model_stock", base, [base] + fts[:2]),
        "model_stock_filter_wise": config("model_stock", base, fts, {"filter_wise": True}),
    }


@pytest.mark.parametrize("case", list(cases("b", ["f0", "f1", "f2"])))
def test_parity_with_mergekit_in_f32(models, tmp_path, case):
    root, base, fts = models
    raw = cases(str(base), [str(f) for f in fts])[case]
    mk = run_mergekit(raw, tmp_path / "mk")
    fx = fx_merge(raw, tmp_path / "fx")
    b = load_folder(base)
    if case.startswith("model_stock"):
        inputs = [load_folder(m["model"]) for m in raw["models"] if m["model"] != str(base)]
        assert set(fx) == set(mk)
        for name in fx:
            mergekit_parity.check_model_stock(name, fx[name], mk[name], b[name], [i[name] for i in inputs],
                                              (raw.get("parameters") or {}).get("filter_wise", False))
        # and the torch reference (mergekit's operations in its order) is still its bits
        ref = {n: model_stock(b[n], [i[n] for i in inputs], filter_wise=(raw.get("parameters") or {})
                              .get("filter_wise", False)) for n in fx}
        assert_bitwise(ref, mk)
    else:
        assert_bitwise(fx, mk)
    assert any(not torch.equal(fx[n], b[n]) for n in fx), "the merge kept the base: the comparison would be vacuous"


def naive_nearswap(t, a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def test_nearswap_matches_a_float64_reference_and_its_endpoints():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(13, 17, generator=g)
    b = a + 0.05 * torch.randn(13, 17, generator=g)
    b[0, :5] = a[0, :5]  # equal elements: |a - b| clamps to 1e-6
    for t in (0.0, 0.01, 0.05, 1.0):
        got = merge_tensors("nearswap", a, [b], t=t)
        np.testing.assert_allclose(got.numpy(), naive_nearswap(t, a.numpy(), b.numpy()), rtol=1e-6, atol=1e-6)
    assert torch.equal(merge_tensors("nearswap", a, [b], t=0.0), a)  # weight 0: the base
    assert torch.equal(merge_tensors("nearswap", a, [b], t=1e3), b)  # weight 1 everywhere: the other model


def naive_model_stock(base, models, filter_wise):
    base = base.astype(np.float64)
    ms = [m.astype(np.float64) for m in models]
    rows = base.reshape(-1, base.shape[-1]) if filter_wise and base.ndim > 1 else base.reshape(1, -1)
    mrows = [m.reshape(rows.shape) for m in ms]
    out = np.empty_like(rows)
    k = len(ms)
    for r in range(rows.shape[0]):
        taus = [m[r] - rows[r] for m in mrows]
        cos = [np.dot(x, y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-6)
               for i, x in enumerate(taus) for y in taus[i + 1:]]
        c = float(np.mean(cos))
        den = 1 + (k - 1) * c
        t = 0.0 if abs(den) < 1e-6 else k * c / den
        out[r] = t * sum(m[r] for m in mrows) / k + (1 - t) * rows[r]
    return out.reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_a_float64_reference(filter_wise):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(8, 12, generator=g)
    shared = 0.1 * torch.randn(8, 12, generator=g)  # correlated fine-tunes: t strictly inside (0, 1)
    ms = [base + shared + 0.1 * torch.randn(8, 12, generator=g) for _ in range(3)]
    got = merge_tensors("model_stock", base, ms, filter_wise=filter_wise)
    want = naive_model_stock(base.numpy(), [m.numpy() for m in ms], filter_wise)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    vec = merge_tensors("model_stock", base[0], [m[0] for m in ms], filter_wise=filter_wise)  # 1-D tensors
    np.testing.assert_allclose(vec.numpy(), naive_model_stock(base[0].numpy(), [m[0].numpy() for m in ms], True),
                               rtol=1e-5, atol=1e-6)


def test_model_stock_keeps_the_base_where_the_interpolation_is_singular():
    g = torch.Generator().manual_seed(7)
    base, d = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    # opposite task vectors: cos = -1, 1 + (k - 1) cos = 0 for k = 2
    assert torch.equal(merge_tensors("model_stock", base, [base + d, base - d]), base)
    got = merge_tensors("model_stock", base, [base + d, base - d], filter_wise=True)
    assert torch.equal(got, base)


@pytest.mark.parametrize("case", ["nearswap", "model_stock_filter_wise"])
def test_bf16_inputs_merge_in_f32_then_round_once(tmp_path, case):
    base, fts = make_models(tmp_path / "bf16", dtype=torch.bfloat16)
    raw = cases(str(base), [str(f) for f in fts])[case]
    got = fx_merge(raw, tmp_path / "fx")
    inputs = [load_folder(p) for p in [base] + (fts if case.startswith("model") else fts[:1])]
    for name, x in got.items():
        assert x.dtype == torch.bfloat16, name
        tensors = [i[name].float() for i in inputs]
        want = merge_tensors(raw["merge_method"], tensors[0], tensors[1:], **(raw.get("parameters") or {}))
        assert torch.equal(x, want.bfloat16()), name


@pytest.mark.parametrize("method,params,n,needle", [
    ("nearswap", {"t": -0.5}, 1, "parameters: t must be in [0, inf], got -0.5"),
    ("nearswap", None, 1, "parameter 't' is required for nearswap"),
    ("nearswap", {"t": 0.1}, 2, "merge_method 'nearswap' merges exactly 2 inputs (base_model and one other model), got 3"),
    ("model_stock", None, 1, "merges at least 3 inputs (base_model and at least two other models), got 2"),
    ("model_stock", {"filter_wise": 1}, 2, "filter_wise must be true or false"),
])
def test_config_errors_name_the_parameter(models, method, params, n, needle):
    root, base, fts = models
    with pytest.raises(ConfigError) as e:
        parse_config(config(method, base, fts[:n], params))
    assert needle in str(e.value)


def test_non_finite_inputs_are_refused_unless_allowed(tmp_path):
    from ferrox import synthetic
    from ferrox.merge import MergeError

    base, fts = make_models(tmp_path / "nan", n_fine_tunes=1)
    tensors = load_folder(fts[0])
    name = sorted(tensors)[0]
    tensors[name].view(-1)[3] = float("nan")
    bad = synthetic.write_model(tmp_path / "bad", tensors, None)
    raw = config("nearswap", base, [bad], {"t": 0.01})
    # the unlisted base_model is the last input (mergekit's order), so the bad model is model[0]
    with pytest.raises(MergeError, match=rf"tensor '{name}': model\[0\] \({bad}\): non-finite value nan at flat index 3"):
        fx_merge(raw, tmp_path / "out")
    out = fx_merge(raw, tmp_path / "out2", allow_nonfinite=True)
    assert torch.isnan(out[name].view(-1)[3])


def test_a_registered_method_runs_through_config_checkpoints_and_merge_tensors(models, tmp_path):
    """The extension point: a TensorMethod with its own declared parameter
    is validated by the config loader and streamed by merge_checkpoints with
    no other code."""
    root, base, fts = models

    def kernel(inputs, scale):
        return inputs.base + scale * sum(x - inputs.base for x in inputs.non_base)

    m = TensorMethod("toy_sum", "test", kernel, (Param("scale", "number", 1.0, lo=0.0, hi=2.0),),
                     base="required", min_inputs=2)
    register(m)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(m)
        with pytest.raises(ConfigError, match="scale must be in \\[0, 2\\], got 3"):
            parse_config(config("toy_sum", base, fts[:2], {"scale": 3}))
        got = fx_merge(config("toy_sum", base, fts[:2], {"scale": 0.5}), tmp_path / "toy")
        b, f0, f1 = (load_folder(p) for p in (base, fts[0], fts[1]))
        for name in got:
            want = b[name] + 0.5 * ((f0[name] - b[name]) + (f1[name] - b[name]))
            assert torch.equal(got[name], want), name
        x = merge_tensors("toy_sum", b[name], [f0[name]], scale=2.0)
        assert torch.equal(x, b[name] + 2.0 * (f0[name] - b[name]))
    finally:
        METHODS.pop("toy_sum")


@pytest.mark.gpu
def test_cuda_merge_of_a_torch_method_matches_the_cpu_merge(models, tmp_path):
    root, base, fts = models
    for name, raw in cases(str(base), [str(f) for f in fts]).items():
        cpu = fx_merge(raw, tmp_path / f"cpu_{name}")
        gpu = fx_merge(raw, tmp_path / f"gpu_{name}", device="cuda")
        for k in cpu:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_merge_holds_one_tensor_of_each_input_at_a_time(models, tmp_path, monkeypatch):
    """Streaming: each tensor's inputs are read together, and every tensor
    read for an earlier output is freed before the next output's are read."""
    import gc
    import weakref

    from ferrox.merge import checkpoints

    root, base, fts = models
    live, order = [], []
    real = checkpoints._Inputs.load

    def load(self, entry):
        x = real(self, entry)
        if not order or order[-1][0] != entry.name:
            gc.collect()
            assert all(r() is None for r in live), f"{entry.name}: an earlier tensor is still held"
            live.clear()
            order.append((entry.name, 0))
        order[-1] = (entry.name, order[-1][1] + 1)
        live.append(weakref.ref(x))
        return x

    monkeypatch.setattr(checkpoints._Inputs, "load", load)
    # the torch path (the core's fused path streams from the files and never loads a tensor)
    monkeypatch.setattr(checkpoints, "_merge_native_files", lambda *a, **k: None)
    fx_merge(config("model_stock", base, fts), tmp_path / "out")
    assert len(order) == len(load_folder(base)) and all(n == 4 for _, n in order)
