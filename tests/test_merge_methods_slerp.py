"""slerp, nuslerp, multislerp and karcher: bit-for-bit parity with mergekit
0.1.5 on float32 Llama-layout checkpoints (ferrox's kernels do mergekit's
operations in its order, in float32, so no ulp bound is needed), naive
float64 references of each formula, the edge cases (endpoints, colinear and
antipodal vectors, zero vectors, chunked norms), bf16/f16 inputs, parameter
checks and the CLI."""

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrox import synthetic
from ferrox.merge import ConfigError, merge_tensors, parse_config
from ferrox.merge.methods import METHODS
from ferrox.merge.methods.karcher import karcher_mean
from ferrox.merge.methods.slerp import SLERP_CHUNK, nuslerp, slerp
from methods_helpers import assert_bitwise, config, fx_merge, load_folder, make_models, run_mergekit

pytest.importorskip("mergekit")  # a test dependency; pinned to 0.1.5 in the venv


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("slerp")
    base, fts = make_models(root)
    return root, base, fts


def cases(base, fts):
    w = lambda *ws: [{"weight": x} for x in ws]  # noqa: E731
    return {
        "slerp": config("slerp", base, [base, fts[0]], {"t": 0.3}),
        "slerp_base_unlisted": config("slerp", base, [fts[0]], {"t": 0.7}),
        "nuslerp": config("nuslerp", None, fts[:2], None, w(0.3, 0.7)),
        "nuslerp_rows_from_base": config("nuslerp", base, fts[:2], {"nuslerp_flatten": False}, w(0.3, 0.7)),
        "nuslerp_row_wise": config("nuslerp", base, fts[:2], {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                   w(0.4, 0.7)),
        "multislerp": config("multislerp", None, fts, None, w(0.2, 0.3, 0.5)),
        "multislerp_from_base": config("multislerp", base, fts, {"normalize_weights": False}, w(0.2, 0.3, 0.6)),
        "karcher": config("karcher", None, fts),
        "karcher_with_base": config("karcher", base, fts[:2], {"max_iter": 3, "tol": 1e-7}),
    }


CASES = list(cases("b", ["f0", "f1", "f2"]))


@pytest.mark.parametrize("case", CASES)
def test_bitwise_parity_with_mergekit_in_f32(models, tmp_path, case):
    root, base, fts = models
    raw = cases(str(base), [str(f) for f in fts])[case]
    mk = run_mergekit(raw, tmp_path / "mk")
    fx = fx_merge(raw, tmp_path / "fx")
    assert_bitwise(fx, mk)
    changed = [n for n in fx if not torch.equal(fx[n], load_folder(fts[0])[n])]
    assert changed, "the merge changed nothing: the comparison would be vacuous"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slerp_of_half_inputs_is_bitwise_mergekit(tmp_path, dtype):
    """mergekit's slerp also computes in f32 and rounds once to the input
    dtype, so half-precision slerp merges agree bit for bit too (its other
    methods here compute in the input dtype, rounding every step; ferrox
    computes those in f32, so they differ by a few half ulps)."""
    base, fts = make_models(tmp_path / "half", n_fine_tunes=1, dtype=dtype)
    raw = config("slerp", base, [fts[0]], {"t": 0.6})
    assert_bitwise(fx_merge(raw, tmp_path / "fx"), run_mergekit(raw, tmp_path / "mk"))


def test_slerp_chunked_norms_and_edge_vectors_match_mergekit():
    """mergekit takes norms and the dot over 2**20-element chunks; a tensor
    over that size, colinear, antipodal and zero inputs give its bits."""
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    g = torch.Generator().manual_seed(0)
    a = torch.randn(SLERP_CHUNK + 4099, generator=g)
    b = torch.randn(SLERP_CHUNK + 4099, generator=g)
    pairs = {"large": (a, b), "colinear": (a, 3 * a), "antipodal": (a, -0.5 * a), "zero": (torch.zeros(64), b[:64]),
             "nearly_colinear": (a[:1000], a[:1000] + 1e-3 * b[:1000])}
    for name, (x, y) in pairs.items():
        for t in (0.0, 0.25, 0.5, 1.0):
            want = mk_slerp(torch.tensor([t]), x[None], y[None])[0]
            got = slerp(t, x, y)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (name, t)


def naive_slerp(t, a, b, threshold=0.9995, eps=1e-8):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.clip(np.dot(a / (na if na > eps else 1), b / (nb if nb > eps else 1)), -1, 1))
    if abs(dot) > threshold:
        return (1 - t) * a + t * b
    th = math.acos(dot)
    return math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b


@given(rows=st.integers(1, 6), cols=st.integers(1, 40), t=st.floats(0, 1), seed=st.integers(0, 10**6))
@settings(max_examples=40, deadline=None)
def test_slerp_matches_a_float64_reference(rows, cols, t, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    got = merge_tensors("slerp", a, [b], t=t)
    want = naive_slerp(t, a.numpy(), b.numpy()).reshape(rows, cols)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6 * float(np.abs(want).max()))


def test_slerp_endpoints_and_colinear_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(17, 9, generator=g), torch.randn(17, 9, generator=g)
    assert torch.equal(merge_tensors("slerp", a, [b], t=0.0), a)
    assert torch.equal(merge_tensors("slerp", a, [b], t=1.0), b)
    for other in (2 * a, -a):  # colinear and antipodal: a plain lerp with f32 coefficients
        t = torch.tensor(0.3)
        assert torch.equal(merge_tensors("slerp", a, [other], t=0.3), (1 - t) * a + t * other)
    # bf16 inputs: computed in f32, rounded once to bf16
    a16, b16 = a.bfloat16(), b.bfloat16()
    got = merge_tensors("slerp", a16, [b16], t=0.4)
    assert got.dtype == torch.bfloat16 and torch.equal(got, slerp(0.4, a16.float(), b16.float()).bfloat16())


def test_slerp_endpoints_give_the_input_checkpoints(models, tmp_path):
    root, base, fts = models
    for t, want in ((0.0, base), (1.0, fts[0])):
        fx = fx_merge(config("slerp", base, [fts[0]], {"t": t}), tmp_path / f"t{t}")
        assert_bitwise(fx, load_folder(want))


def naive_nuslerp(t, v0, v1, mode):
    """mode: 'flat', 'rows' (each row of the last dim) or 'cols' (each vector along dim 0)."""
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    if mode == "flat":
        return naive_pair(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
    if mode == "cols":
        return naive_nuslerp(t, v0.T, v1.T, "rows").T
    out = np.empty_like(v0)
    for i in range(v0.shape[0]):
        out[i] = naive_pair(t, v0[i], v1[i])
    return out


def naive_pair(t, x, y):
    c = np.clip(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1)
    if 1 - c * c <= 1e-16:
        return (1 - t) * x + t * y
    th = math.acos(c)
    return (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)


@pytest.mark.parametrize("mode", ["flat", "rows", "cols"])
def test_nuslerp_matches_a_float64_reference(mode):
    g = torch.Generator().manual_seed(2)
    base, x, y = (torch.randn(12, 7, generator=g) for _ in range(3))
    kw = dict(nuslerp_flatten=mode == "flat", nuslerp_row_wise=mode == "cols")
    got = merge_tensors("nuslerp", base, [x, y], weight=[1.0, 3.0], **kw)
    want = base.double().numpy() + naive_nuslerp(0.75, (x - base).numpy(), (y - base).numpy(), mode)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    # weights cancelling: mergekit's midpoint
    mid = merge_tensors("nuslerp", None, [x, y], weight=[1.0, -1.0], **kw)
    np.testing.assert_allclose(mid.numpy(), naive_nuslerp(0.5, x.numpy(), y.numpy(), mode), rtol=1e-5, atol=1e-5)
    # exactly colinear rows (cos = 1 in f32: mergekit's test is 1 - cos² <= 1e-16): a lerp
    e = 3 * torch.eye(7)[:5]
    assert torch.equal(nuslerp(0.3, e, 2 * e), (1 - 0.3) * e + 0.3 * (2 * e))


def naive_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    xs = [x.astype(np.float64).ravel() - (0 if base is None else base.astype(np.float64).ravel()) for x in xs]
    w = np.asarray(w, np.float64)
    w = w / w.sum() if normalize else w
    norms = np.array([np.linalg.norm(x) for x in xs])
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean /= np.linalg.norm(mean)
    tangent = sum(wi * (u - np.dot(u, mean) * mean) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent) + eps
    out = (mean * math.cos(tn) + tangent * math.sin(tn) / tn) * float(np.dot(norms, w))
    return out + (0 if base is None else base.astype(np.float64).ravel())


def test_multislerp_matches_a_float64_reference_and_refuses_cancelling_models():
    g = torch.Generator().manual_seed(3)
    base, *xs = (torch.randn(9, 11, generator=g) for _ in range(4))
    for b, normalize in ((None, True), (base, False)):
        got = merge_tensors("multislerp", b, xs, weight=[0.2, 0.5, 0.3], normalize_weights=normalize)
        want = naive_multislerp([x.numpy() for x in xs], [0.2, 0.5, 0.3], None if b is None else b.numpy(), normalize)
        np.testing.assert_allclose(got.numpy().ravel(), want, rtol=2e-5, atol=2e-5)
    x = xs[0]
    # two antipodal models with equal weights: mergekit's lerp fallback (here exactly zero)
    assert torch.equal(merge_tensors("multislerp", None, [x, -x], weight=[1.0, 1.0]), torch.zeros_like(x))
    with pytest.raises(ValueError, match="weighted mean of the models' directions is zero"):
        merge_tensors("multislerp", None, [x, -x, x, -x], weight=[1.0, 1.0, 1.0, 1.0])
    assert torch.equal(merge_tensors("multislerp", base, [x], weight=[2.0]), x)  # one model: itself


def test_karcher_mean_is_the_riemannian_centre():
    """At the Karcher mean m, the log maps of the inputs' directions sum to
    zero (first-order optimality on the sphere); its norm is the mean norm."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(10, 8, generator=g) * s for s in (1.0, 2.0, 0.5)]
    got = merge_tensors("karcher", None, xs, max_iter=200, tol=1e-9).double().numpy().ravel()
    norms = [float(np.linalg.norm(x.double().numpy())) for x in xs]
    assert math.isclose(np.linalg.norm(got), sum(norms) / 3, rel_tol=1e-5)
    m = got / np.linalg.norm(got)
    log_sum = np.zeros_like(m)
    for x in xs:
        u = x.double().numpy().ravel() / np.linalg.norm(x.double().numpy())
        c = np.clip(np.dot(m, u), -1, 1)
        th = math.acos(c)
        log_sum += th / math.sin(th) * (u - c * m)
    assert np.linalg.norm(log_sum) < 1e-4
    # no iterations: the normalised weighted mean of the directions, scaled
    zero = karcher_mean([x.reshape(-1) for x in xs], [1 / 3] * 3, max_iter=0).double().numpy()
    units = sum(x.double().numpy().ravel() / n for x, n in zip(xs, norms)) / 3
    np.testing.assert_allclose(zero, units / np.linalg.norm(units) * sum(norms) / 3, rtol=1e-5, atol=1e-6)
    # all-zero inputs: zero
    assert torch.equal(merge_tensors("karcher", None, [torch.zeros(5), torch.zeros(5)]), torch.zeros(5))


def f32_copy(src, dst):
    tensors = {k: v.float() for k, v in load_folder(src).items()}
    return synthetic.write_model(dst, tensors, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_merge_in_f32_then_round_once(tmp_path, dtype):
    """Half inputs are upcast exactly, merged in f32 and rounded once: the
    result is the f32 merge of the upcast inputs, cast to the input dtype."""
    base, fts = make_models(tmp_path / "half", dtype=dtype)
    up = [f32_copy(p, tmp_path / f"up{i}") for i, p in enumerate([base] + fts)]
    upcast = cases(str(up[0]), [str(u) for u in up[1:]])
    for name, raw in cases(str(base), [str(f) for f in fts]).items():
        half = fx_merge(raw, tmp_path / f"fx_{name}")
        full = fx_merge(upcast[name], tmp_path / f"f32_{name}")
        assert_bitwise(half, {k: v.to(dtype) for k, v in full.items()})
    # and an explicit dtype: f32 inputs merged as float16 (inputs rounded first, as mergekit casts on load)
    out = fx_merge(dict(upcast["slerp"], dtype="float16"), tmp_path / "as_f16")
    assert all(v.dtype == torch.float16 for v in out.values())


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["parameters"].update(t=1.5), "parameters: t must be in [0, 1], got 1.5"),
    (lambda c: c["parameters"].update(t=-0.1), "t must be in [0, 1]"),
    (lambda c: c["parameters"].update(t="half"), "t must be a number, got 'half'"),
    (lambda c: c["parameters"].pop("t"), "parameter 't' is required for slerp"),
    (lambda c: c["parameters"].update(t=[0, 1.5]), "parameters: t must be in [0, 1], got 1.5"),
    (lambda c: c["parameters"].update(density=0.5), "unknown parameter 'density' for slerp (known: ['t'])"),
    (lambda c: c.pop("base_model"), "merge_method 'slerp' needs base_model"),
    (lambda c: c["models"].append({"model": c["extra"]}), "merges exactly 2 inputs"),
    (lambda c: c["models"][0].update(parameters={"weight": 1.0}), "unknown parameter 'weight' for slerp"),
])
def test_slerp_config_errors_name_the_parameter(models, edit, needle):
    root, base, fts = models
    raw = config("slerp", base, [base, fts[0]], {"t": 0.5})
    raw["extra"] = str(fts[1])
    edit(raw)
    raw.pop("extra")
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert needle in str(e.value)


@pytest.mark.parametrize("method,params,model_params,needle", [
    ("nuslerp", None, [{}, {"weight": 1.0}], "models[0]: parameter 'weight' is required for nuslerp"),
    ("nuslerp", {"nuslerp_flatten": "yes"}, [{"weight": 1.0}] * 2, "nuslerp_flatten must be true or false"),
    ("nuslerp", None, [{"weight": 1.0}] * 3, "merges exactly 2 models besides the base model"),
    ("nuslerp", None, [{"weight": 1.0, "nuslerp_flatten": False}] * 2, "'nuslerp_flatten' of nuslerp is global"),
    ("multislerp", {"eps": -1e-3}, [{"weight": 1.0}] * 3, "eps must be in [0, inf]"),
    ("multislerp", None, [{"weight": 1.0}, {"weight": -1.0}, {"weight": 0.0}], "normalize_weights: true divides"),
    ("karcher", {"max_iter": -1}, None, "max_iter must be in [0, 1000001)"),
    ("karcher", {"max_iter": 2.5}, None, "max_iter must be an integer"),
    ("karcher", {"tol": -1.0}, None, "tol must be in [0, inf]"),
])
def test_family_config_errors_name_the_parameter(models, method, params, model_params, needle):
    root, base, fts = models
    ms = fts[:len(model_params)] if model_params else fts
    with pytest.raises(ConfigError) as e:
        parse_config(config(method, None, ms, params, model_params))
    assert needle in str(e.value)


def test_per_model_parameters_of_the_base_are_refused_not_ignored(models):
    root, base, fts = models
    raw = config("nuslerp", base, [base] + fts[:2], None, [{"weight": 1.0}] * 3)
    with pytest.raises(ConfigError, match=r"models\[0\]: parameter 'weight' does not apply to the base model of nuslerp"):
        parse_config(raw)
    ok = parse_config(config("nuslerp", base, [base] + fts[:2], None, [None, {"weight": 1.0}, {"weight": 2.0}]))
    assert [m.is_base for m in ok.models] == [True, False, False] and ok.base_index == 0


def test_registry_declares_every_parameter_with_mergekit_defaults():
    want = {"slerp": {"t": None}, "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
            "multislerp": {"normalize_weights": True, "eps": 1e-8}, "karcher": {"max_iter": 10, "tol": 1e-5}}
    for name, defaults in want.items():
        m = METHODS[name]
        assert not m.in_core
        assert {p.name: (None if p.required else p.default) for p in m.global_params} == defaults
    assert METHODS["nuslerp"].model_params == ("weight",) and METHODS["karcher"].model_params == ()


def test_cli_merges_a_slerp_config(models, tmp_path, capsys):
    from ferrox.cli import main

    root, base, fts = models
    raw = config("slerp", base, [base, fts[0]], {"t": 0.3})
    path = tmp_path / "slerp.yml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress", "--out-shard-size", "20k"]) == 0
    said = capsys.readouterr()
    assert "with slerp" in said.out + said.err
    got = load_folder(tmp_path / "out")
    assert_bitwise(got, fx_merge(raw, tmp_path / "api"))
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1  # the shard size in bytes is honoured
    resolved = yaml.safe_load((tmp_path / "out" / "ferrox_config.yml").read_text())
    assert resolved["merge_method"] == "slerp" and resolved["parameters"] == {"t": 0.3}
    assert [m["model"] for m in resolved["models"]] == [str(base), str(fts[0])]
