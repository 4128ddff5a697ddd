"""Gradient lists and filters for every parameter, resolved as mergekit 0.1.5
does: parity of whole merges (slerp with a filtered gradient ``t``: bitwise;
ties and task_arithmetic with per-model gradient weights: mergekit_parity's
rules), the setting rule itself against mergekit's ``evaluate_setting`` on
random settings, a naive reference of a layer's ``t``, precedence (a
model's filter that misses falls back to the global setting) and malformed
settings refused naming the key."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergekit_parity
from ferrox import synthetic
from ferrox.merge import ConfigError, parse_config
from ferrox.merge.methods import METHODS
from ferrox.merge.settings import layer_t, parse_setting
from methods_helpers import assert_bitwise, config, fx_merge, load_folder, run_mergekit

pytest.importorskip("mergekit")  # a test dependency; pinned to 0.1.5 in the venv

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    base = synthetic.make_llama(root / "base", hidden=32, layers=LAYERS, vocab=64, dtype=torch.float32)
    fts = [synthetic.fine_tune(base, root / f"ft{i}", seed=i + 1) for i in range(2)]
    return base, fts


def naive_t(name):
    """A layer's t by its index (mergekit: i / (n - 1)); 0 outside the layers."""
    if ".layers." not in name:
        return 0.0
    i = int(name.split(".layers.")[1].split(".")[0])
    return i / (LAYERS - 1)


def naive_gradient(values, t):
    """Piecewise-linear interpolation over evenly spaced knots, written out."""
    if len(values) == 1:
        return values[0]
    pos = t * (len(values) - 1)
    lo = min(int(pos), len(values) - 1)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (pos - lo) * (values[hi] - values[lo])


SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]


def test_slerp_with_a_filtered_gradient_t_is_bitwise_mergekit(models, tmp_path):
    base, fts = models
    raw = config("slerp", str(base), [str(base), str(fts[0])], {"t": SLERP_T})
    fx = fx_merge(raw, tmp_path / "fx")
    assert_bitwise(fx, run_mergekit(raw, tmp_path / "mk"))
    # Each tensor is slerp at the t the naive rule gives, so the gradient really varied per layer.
    from ferrox.merge.methods.slerp import slerp

    b, f = load_folder(base), load_folder(fts[0])
    seen = set()
    for name in fx:
        knots = SLERP_T[0]["value"] if "self_attn" in name else SLERP_T[1]["value"] if "mlp" in name else None
        t = 0.5 if knots is None else naive_gradient(knots, naive_t(name))
        seen.add(round(t, 6))
        assert torch.equal(fx[name], slerp(t, b[name], f[name])), name
    assert len(seen) >= 5


def test_ties_with_a_per_model_gradient_weight_matches_mergekit(models, tmp_path):
    """ties runs in the Rust core, which matches mergekit by mergekit_parity's
    rule (4 ulp; masks equal off the cut), here at every tensor's own weights."""
    base, fts = models
    w0 = [0.2, 1.0, 0.4]
    w1 = [{"filter": "mlp", "value": [1.0, 0.1]}, {"value": 0.6}]
    raw = config("ties", str(base), [str(f) for f in fts], {"density": 0.5},
                 [{"weight": w0}, {"weight": w1, "density": 0.7}])
    fx = fx_merge(raw, tmp_path / "fx")
    mk = run_mergekit(raw, tmp_path / "mk")
    b = load_folder(base)
    ins = [load_folder(f) for f in fts]
    compared = total = 0
    for name in fx:
        t = naive_t(name)
        params = [{"weight": naive_gradient(w0, t), "density": 0.5, "gamma": 0.01},
                  {"weight": naive_gradient([1.0, 0.1], t) if "mlp" in name else 0.6, "density": 0.7, "gamma": 0.01}]
        compared += mergekit_parity.check_sparsified(name, "ties", params, fx[name], mk[name], b[name],
                                                     [i[name] for i in ins])
        total += fx[name].numel()
    assert compared >= mergekit_parity.COVERAGE * total
    # The weights differ per layer: layer 0 and the last layer merge differently.
    cfg = parse_config(raw)
    cfg.num_layers = LAYERS
    first = cfg.tensor_params("model.layers.0.mlp.up_proj.weight")[1]
    last = cfg.tensor_params(f"model.layers.{LAYERS - 1}.mlp.up_proj.weight")[1]
    assert [m["weight"] for m in first] == [0.2, 1.0] and [m["weight"] for m in last] == [0.4, 0.1]


def test_task_arithmetic_filter_miss_falls_back_to_the_global_setting(models, tmp_path):
    """A model's filter list without a match defers to the global weight
    (mergekit's precedence), not to the method's default."""
    base, fts = models
    raw = config("task_arithmetic", str(base), [str(f) for f in fts], {"weight": [0.1, 0.9], "lambda": [1, 0.5]},
                 [{"weight": [{"filter": "self_attn", "value": 2.0}]}, None])
    fx = fx_merge(raw, tmp_path / "fx")
    mk = run_mergekit(raw, tmp_path / "mk")
    b = load_folder(base)
    ins = [load_folder(f) for f in fts]
    for name in fx:
        mergekit_parity.check_dense(name, fx[name], mk[name], b[name], [i[name] for i in ins])
    cfg = parse_config(raw)
    cfg.num_layers = LAYERS
    shared, per = cfg.tensor_params("model.layers.3.mlp.up_proj.weight")
    assert [m["weight"] for m in per] == [0.9, 0.9] and shared["lambda"] == 0.5
    shared, per = cfg.tensor_params("model.layers.0.self_attn.q_proj.weight")
    assert [m["weight"] for m in per] == [2.0, 0.1] and shared["lambda"] == 1.0
    shared, per = cfg.tensor_params("lm_head.weight")  # outside the layers: t = 0
    assert [m["weight"] for m in per] == [0.1, 0.1]


knots = st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(values=knots, t=st.floats(0, 1), flt=st.sampled_from([None, "*", "mlp", "attn", "nowhere"]),
       name=st.sampled_from(["model.layers.2.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                             "lm_head.weight"]), fallback=st.booleans())
def test_settings_evaluate_as_mergekit(values, t, flt, name, fallback):
    from mergekit.config import ConditionalParameter, evaluate_setting

    p = METHODS["task_arithmetic"].param("weight")
    for raw in (values, values[0]):
        assert parse_setting("x", "weight", raw, p).evaluate(name, t) == evaluate_setting(name, raw, t, validate=float)
        want = naive_gradient(values, t) if isinstance(raw, list) else raw
        assert abs(parse_setting("x", "weight", raw, p).evaluate(name, t) - want) <= 1e-12 * (1 + abs(want))
    conds = [{"filter": flt, "value": values}] + ([{"value": 0.25}] if fallback else [])
    mk = evaluate_setting(name, [ConditionalParameter(**c) for c in conds], t, validate=float)
    assert parse_setting("x", "weight", conds, p).evaluate(name, t) == mk


def test_flag_gradients_select_and_layer_t_is_mergekits():
    p = METHODS["ties"].param("normalize")
    s = parse_setting("parameters", "normalize", [True, False, True], p)
    assert [s.evaluate("", t) for t in (0, 0.49, 0.5, 0.99, 1.0)] == [True, True, False, False, True]
    assert [layer_t(i, 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_t(0, 1) == 1.0  # one layer: mergekit's t = 1


@pytest.mark.parametrize("params,model_params,needle", [
    ({"t": []}, None, "parameters: t: an empty gradient list has no value"),
    ({"t": [0, [0.5]]}, None, "t[1]: a gradient list holds scalars"),
    ({"t": [0, 2]}, None, "parameters: t must be in [0, 1], got 2"),
    ({"t": {"filter": "mlp"}}, None, "t[0]: a filter entry needs a 'value'"),
    ({"t": [{"filter": "mlp", "value": 0.5, "weight": 1}]}, None, "unknown key 'weight'"),
    ({"t": [{"filter": 3, "value": 0.5}]}, None, "filter must be a non-empty string"),
    ({"t": [{"value": {"filter": "mlp", "value": 0.5}}]}, None, "not another filter"),
    ({"t": [{"filter": "mlp", "value": 0.5}, 0.3]}, None, "t[1]: expected a mapping"),
])
def test_malformed_settings_are_refused_naming_the_key(models, params, model_params, needle):
    base, fts = models
    with pytest.raises(ConfigError) as e:
        parse_config(config("slerp", str(base), [str(base), str(fts[0])], params))
    assert needle in str(e.value)


def test_integer_gradient_and_missing_required_filter_are_refused(models):
    base, fts = models
    with pytest.raises(ConfigError, match="seed is an integer; a gradient list"):
        parse_config(config("dare_linear", str(base), [str(fts[0])], {"seed": [1, 2]}, [{"weight": 1.0}]))
    cfg = parse_config(config("slerp", str(base), [str(base), str(fts[0])], {"t": [{"filter": "mlp", "value": 0.3}]}))
    assert cfg.tensor_params("model.layers.0.mlp.up_proj.weight")[0]["t"] == 0.3
    with pytest.raises(ConfigError, match=r"no filter of 't' matches tensor 'lm_head.weight'"):
        cfg.tensor_params("lm_head.weight")
    cfg = parse_config(config("task_arithmetic", str(base), [str(fts[0])], None,
                              [{"weight": [{"filter": "mlp", "value": 0.3}]}]))
    with pytest.raises(ConfigError, match=r"models\[0\]: no filter of 'weight' matches tensor 'lm_head.weight'"):
        cfg.tensor_params("lm_head.weight")


def test_a_seed_set_after_parsing_reaches_per_tensor_resolution(models):
    """--random-seed sets cfg.seed; with gradients the parameters are resolved
    per tensor, and the seed must still be the one set."""
    base, fts = models
    raw = config("dare_linear", str(base), [str(f) for f in fts], None,
                 [{"weight": [0.2, 0.8], "density": 0.5}, {"weight": 0.5, "density": 0.5}])
    cfg = parse_config(raw)
    cfg.num_layers = LAYERS
    cfg.seed = 77
    assert cfg.tensor_params("model.layers.1.mlp.up_proj.weight")[0]["seed"] == 77
    cfg = parse_config(dict(raw, parameters={"seed": [{"filter": "mlp", "value": 3}, {"value": 4}]}))
    cfg.num_layers = LAYERS
    assert cfg.tensor_params("model.layers.1.mlp.up_proj.weight")[0]["seed"] == 3
    cfg.seed = 9
    assert cfg.tensor_params("model.layers.1.mlp.up_proj.weight")[0]["seed"] == 9
