"""della, della_linear and sce against mergekit 0.1.5 in float32.

DELLA's masks are random. With ``rng: tensor`` (the default) ferrox draws
each tensor's masks in the Rust core from Philox keyed by ``mask_seed(seed,
tensor name)``, not from torch's generator, so outputs cannot be compared
with mergekit's draw for draw. Instead: every tensor of a ferrox checkpoint
merge equals mergekit's own della method run on that tensor with its
``torch.bernoulli`` draws replaced by ferrox's masks, to a stated float32
tolerance (the core sums in float64 and folds the rescale into the weight);
with ``rng: mergekit`` whole runs equal ``mergekit-yaml --random-seed`` bit
for bit; with density 1 (no draws) the whole runs agree bitwise; sce
(deterministic) agrees bitwise run for run. The torch MagPrune (``rng:
mergekit``) is checked against a naive reference: per-element keep
probabilities by rank, the kept fraction over many draws, and the L1
rescale. The core's masks and arithmetic have their own naive references in
test_merge_della_core.py."""

import math

import pytest
import torch

from ferrox.merge import ConfigError, parse_config
from ferrox.merge.methods.della import core_keep, magprune, magprune_probabilities
from methods_helpers import assert_bitwise, config, fx_merge, load_folder, make_models, run_mergekit

pytest.importorskip("mergekit")  # a test dependency; pinned to 0.1.5 in the venv


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("della")
    base, fts = make_models(root, n_fine_tunes=2)
    return base, [str(f) for f in fts]


def della_cases(base, fts):
    mp = [{"weight": 0.6, "density": 0.5, "epsilon": 0.2}, {"weight": 0.5, "density": 0.4}]
    return {
        "della": config("della", base, fts, None, mp),
        "della_no_rescale_lambda": config("della", base, fts, {"rescale": False, "lambda": 1.3}, mp),
        "della_linear": config("della_linear", base, fts, {"normalize": True}, mp),
        "della_linear_plain": config("della_linear", base, fts, {"rescale": False}, mp),
    }


@pytest.mark.parametrize("case", list(della_cases("b", ["f0", "f1"])))
def test_della_equals_mergekits_method_on_the_same_masks(models, tmp_path, case, monkeypatch):
    from mergekit.merge_methods import get as mk_method
    from mergekit.merge_methods.base import TensorGroup

    base, fts = models
    raw = della_cases(str(base), fts)[case]
    fx = fx_merge(raw, tmp_path / "fx")
    cfg = parse_config(raw)
    b, ins = load_folder(base), [load_folder(f) for f in fts]
    mk = mk_method(raw["merge_method"])
    per = [m["parameters"] for m in raw["models"]]
    shared = dict(normalize=cfg.params["normalize"], rescale=cfg.params["rescale"], int8_mask=False)
    shared["lambda"] = cfg.params["lambda"]
    changed = worst = 0.0
    for name in fx:
        masks = [core_keep(b[name], i[name], p["density"], p.get("epsilon", 0.15), 0, name, m)
                 for m, (i, p) in enumerate(zip(ins, per))]
        queue = list(masks)

        def bernoulli(probs, *args, **kw):  # mergekit draws each model's mask in model order
            mask = queue.pop(0)
            assert mask.numel() == probs.numel()
            return mask.reshape(probs.shape).to(probs.dtype)

        monkeypatch.setattr(torch, "bernoulli", bernoulli)
        group = TensorGroup.from_tensors([i[name] for i in ins] + [b[name]], base_index=len(ins))
        want = mk.merge_group(group, weight={i: p["weight"] for i, p in enumerate(per)},
                              density={i: p["density"] for i, p in enumerate(per)},
                              epsilon={i: p.get("epsilon", 0.15) for i, p in enumerate(per)}, **shared)
        monkeypatch.undo()
        assert not queue, name
        # Tolerance: 8 float32 ulp (2^-24 relative) of |base| + 4 Σ|τ| (the rescale factor is below 4 here).
        scale = b[name].abs() + sum(i[name].sub(b[name]).abs() * 4 for i in ins)
        err = float(((fx[name] - want).abs() / scale.clamp_min(1e-30)).max())
        worst = max(worst, err)
        assert err <= 8 * 2.0 ** -24, (name, err)
        changed += int((fx[name] != b[name]).sum())
    # Without rescale the core's float32 operations are mergekit's, in its order: bitwise (measured: with
    # rescale, at most 1.9 * 2^-24 of the scale).
    if not shared["rescale"]:
        assert worst == 0, worst
    assert changed > 0


def test_della_without_draws_and_sce_are_bitwise_mergekit_runs(models, tmp_path):
    base, fts = models
    runs = {
        "della_density_1": config("della", str(base), fts, None, [{"weight": 0.7}, {"weight": -0.2}]),
        "sce": config("sce", str(base), fts, {"select_topk": 0.4}),
        "sce_all": config("sce", str(base), fts),
        "sce_listed_base": config("sce", str(base), [str(base)] + fts, {"select_topk": 0.7}),
    }
    for case, raw in runs.items():
        fx = fx_merge(raw, tmp_path / f"fx-{case}")
        assert_bitwise(fx, run_mergekit(raw, tmp_path / f"mk-{case}"))
        assert any(not torch.equal(fx[n], load_folder(base)[n]) for n in fx), case


def naive_probabilities(delta, density, epsilon):
    """Rank r (1 = smallest |delta|) of n in each row: density - eps + 2 eps (r - 1)/(n - 1), in float64."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    out = torch.empty(rows.shape, dtype=torch.float64)
    for i, row in enumerate(rows.tolist()):
        order = sorted(range(len(row)), key=lambda j: abs(row[j]))
        for r, j in enumerate(order):
            out[i, j] = density - epsilon + 2 * epsilon * r / max(1, len(row) - 1)
    return out


def test_magprune_sampling_matches_a_naive_reference():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(6, 40, generator=g)  # distinct magnitudes: ranks are unambiguous
    density, eps = 0.4, 0.25
    probs = magprune_probabilities(delta, density, eps)
    assert torch.allclose(probs.double(), naive_probabilities(delta, density, eps), atol=1e-6)
    assert abs(float(probs.mean()) - density) < 1e-6
    # Kept frequency: one row repeated, ranked row by row, gives independent draws per rank in one call.
    draws = 4000
    rows = delta[:1].expand(draws, -1).contiguous()
    out = magprune(rows, density, eps, rescale=False, generator=g)
    assert torch.all((out == 0) | (out == rows))
    freq = (out != 0).double().mean(dim=0)
    p = probs[0].double()
    sd = torch.sqrt(p * (1 - p) / draws)
    assert float(((freq - p).abs() / sd).max()) < 5  # every rank within 5 sigma of its p
    assert abs(float(freq.mean()) - density) < 0.01
    # Rescale: the kept values are scaled so the whole delta keeps its L1 norm (mergekit's rule, not 1/p).
    out = magprune(delta, density, eps, rescale=True, generator=g)
    kept_mask = out != 0
    ratio = float(delta.abs().sum() / (delta * kept_mask).abs().sum())
    assert torch.allclose(out[kept_mask], delta[kept_mask] * ratio, rtol=1e-6)
    assert math.isclose(float(out.abs().sum()), float(delta.abs().sum()), rel_tol=1e-5)
    # 1-D tensors are one row; density 1 keeps all; density 0 drops all.
    v = torch.randn(50, generator=g)
    assert torch.allclose(magprune_probabilities(v, 0.5, 0.1).double().reshape(-1),
                          naive_probabilities(v, 0.5, 0.1).reshape(-1), atol=1e-6)
    assert torch.equal(magprune(v, 1.0, 0.1, True, g), v)
    assert torch.equal(magprune(v, 0.0, 0.1, True, g), torch.zeros_like(v))


def test_della_mask_seed_and_errors(models, tmp_path):
    base, fts = models
    raw = config("della", str(base), fts, {"seed": 5}, [{"weight": 1.0, "density": 0.5}] * 2)
    a = fx_merge(raw, tmp_path / "a")
    b = fx_merge(raw, tmp_path / "b")
    c = fx_merge(dict(raw, parameters={"seed": 6}), tmp_path / "c")
    assert all(torch.equal(a[n], b[n]) for n in a)  # reproducible
    assert any(not torch.equal(a[n], c[n]) for n in a)  # the seed changes the draws
    # merge_tensors draws the same masks as a checkpoint merge (same tensor name, same seed).
    from ferrox.merge import merge_tensors

    name = "model.layers.0.mlp.down_proj.weight"
    bt, ins = load_folder(base), [load_folder(f) for f in fts]
    got = merge_tensors("della", bt[name], [i[name] for i in ins], weight=1.0, density=0.5, seed=5, tensor_name=name)
    assert torch.equal(got, a[name])
    with pytest.raises(ConfigError, match=r"density - epsilon > 0 and density \+ epsilon < 1.*density 0.1, "
                                          r"epsilon 0.15"):
        parse_config(config("della", str(base), fts, None, [{"weight": 1.0, "density": 0.1}] * 2))
    with pytest.raises(ConfigError, match="parameter 'weight' is required for della_linear"):
        parse_config(config("della_linear", str(base), fts, None, [{"density": 0.5}] * 2))
    with pytest.raises(ConfigError, match="merge_method 'sce' needs base_model"):
        parse_config(config("sce", None, fts))
    with pytest.raises(ConfigError, match="select_topk must be a fraction"):
        parse_config(config("sce", str(base), fts, {"select_topk": 2}))
    # A per-layer epsilon that breaks the rule at some layer is refused at that tensor.
    cfg = parse_config(config("della", str(base), fts, None, [{"weight": 1.0, "density": 0.5,
                                                               "epsilon": [0.1, 0.6]}] * 2))
    cfg.num_layers = 2
    cfg.tensor_params("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' \(t=1\): models\[0\]"):
        cfg.tensor_params("model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_rescale_variants_of_the_rust_core_methods_match_mergekit(models, tmp_path, method):
    """mergekit's sparsify offers ``rescale`` (an L1 rescale of each kept
    delta) to every GTA method; the Rust core's agrees by mergekit_parity's
    rule (masks equal off the cut, values within 4 ulp). DARE's rescale is
    the same code path, its masks random (not comparable draw for draw)."""
    import mergekit_parity

    base, fts = models
    mp = [{"weight": 0.6, "density": 0.5, "gamma": 0.05}, {"weight": 0.5, "density": 0.3, "gamma": 0.02}]
    raw = config(method, str(base), fts, {"rescale": True}, mp)
    fx, mk = fx_merge(raw, tmp_path / "fx"), run_mergekit(raw, tmp_path / "mk")
    unscaled = fx_merge(dict(raw, parameters={"rescale": False}), tmp_path / "plain")
    b, ins = load_folder(base), [load_folder(f) for f in fts]
    compared = total = 0
    for name in fx:
        compared += mergekit_parity.check_sparsified(name, method, mp, fx[name], mk[name], b[name],
                                                     [i[name] for i in ins], compare_all_dropped=True)
        total += fx[name].numel()
    assert compared >= mergekit_parity.COVERAGE * total
    assert any(not torch.equal(fx[n], unscaled[n]) for n in fx)  # the rescale changed the merge


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_rng_mergekit_gives_mergekits_whole_run_bits(models, tmp_path, method):
    """``rng: mergekit``: one generator seeded with ``seed``, tensors in name
    order (mergekit's executor order), so a whole run equals
    ``mergekit-yaml --random-seed`` bit for bit."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, fts = models
    mp = [{"weight": 0.6, "density": 0.5, "epsilon": 0.2}, {"weight": 0.5, "density": 0.4}]
    raw = config(method, str(base), fts, None, mp)
    run_merge(MergeConfiguration.model_validate(raw), str(tmp_path / "mk"),
              options=MergeOptions(allow_crimes=True, quiet=True, copy_tokenizer=False, write_model_card=False,
                                   random_seed=11))
    mk = load_folder(tmp_path / "mk")
    fx = fx_merge(dict(raw, parameters={"seed": 11, "rng": "mergekit"}), tmp_path / "fx")
    assert_bitwise(fx, mk)
    other = fx_merge(dict(raw, parameters={"seed": 12, "rng": "mergekit"}), tmp_path / "fx12")
    assert any(not torch.equal(fx[n], other[n]) for n in fx)  # the draws depend on the seed
