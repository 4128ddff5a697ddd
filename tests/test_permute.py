"""Weight matching: a planted hidden-unit permutation is recovered exactly,
permuting keeps the function and the singular values, and aligning two
independently trained MLPs lowers the loss barrier at their midpoint."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrox.merge.permute import PermutationSpec, apply_permutation, invert, mlp_spec, weight_matching

WIDTHS = (20, 64, 48, 32, 5)  # input, three hidden layers, output
LAYERS = [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(len(WIDTHS) - 1)]


def mlp(seed, widths=WIDTHS):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def planted(seed, dtype=torch.float32):
    """A model, its state dict in `dtype` and a copy with hidden units permuted
    by random permutations (returned too)."""
    model = mlp(seed)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    spec = mlp_spec(LAYERS)
    g = torch.Generator().manual_seed(seed + 100)
    sigma = {p: torch.randperm(WIDTHS[i + 1], generator=g) for i, p in enumerate(sorted(spec.axes))}
    return model, sd, spec, sigma, apply_permutation(sd, spec, sigma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_permutation_is_recovered_exactly(seed, dtype):
    model, a, spec, sigma, b = planted(seed, dtype)
    perms = weight_matching(a, b, spec, seed=seed)
    for name, s in sigma.items():
        assert torch.equal(perms[name], torch.argsort(s)), name
    aligned = apply_permutation(b, spec, perms)
    for name in a:
        assert torch.equal(aligned[name], a[name]), name
        assert aligned[name].dtype == dtype


def test_permuted_model_computes_the_same_function():
    model, a, spec, sigma, b = planted(3)
    other = mlp(3)
    other.load_state_dict(b)
    x = torch.randn(256, WIDTHS[0])
    torch.testing.assert_close(other(x), model(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(b["0.weight"], a["0.weight"])


def test_singular_values_are_unchanged():
    _, a, spec, sigma, b = planted(4)
    for name, _ in LAYERS:
        sa, sb = torch.linalg.svdvals(a[name].double()), torch.linalg.svdvals(b[name].double())
        torch.testing.assert_close(sb, sa, rtol=1e-6, atol=0)


def test_identity_permutation_is_the_identity():
    _, a, spec, _, _ = planted(5)
    ident = {p: torch.arange(WIDTHS[i + 1]) for i, p in enumerate(sorted(spec.axes))}
    out = apply_permutation(a, spec, ident)
    assert all(torch.equal(out[k], a[k]) for k in a)


@settings(max_examples=30, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=3, max_size=5), seed=st.integers(0, 1000))
def test_apply_then_invert_gives_back_the_original(widths, seed):
    layers = [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(len(widths) - 1)]
    sd = mlp(seed, widths).state_dict()
    spec = mlp_spec(layers)
    g = torch.Generator().manual_seed(seed)
    perms = {f"hidden{i}": torch.randperm(widths[i + 1], generator=g) for i in range(len(widths) - 2)}
    back = apply_permutation(apply_permutation(sd, spec, perms), spec, invert(perms))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _train(seed, x, y, steps=300):
    model = mlp(seed, (x.shape[1], 64, 64, int(y.max()) + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _loss_at(a, b, x, y, lam=0.5):
    model = mlp(0, (x.shape[1], 64, 64, int(y.max()) + 1))
    model.load_state_dict({k: (1 - lam) * a[k] + lam * b[k] for k in a})
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def test_matching_lowers_the_midpoint_barrier():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    spec = mlp_spec([("0.weight", "0.bias"), ("2.weight", "2.bias"), ("4.weight", "4.bias")])
    for seed in range(3):
        a = _train(2 * seed, x, y).state_dict()
        b = _train(2 * seed + 1, x, y).state_dict()
        ends = (_loss_at(a, b, x, y, 0.0) + _loss_at(a, b, x, y, 1.0)) / 2
        before = _loss_at(a, b, x, y) - ends
        aligned = apply_permutation(b, spec, weight_matching(a, b, spec, seed=seed))
        after = _loss_at(a, aligned, x, y) - ends
        print(f"seed {seed}: midpoint loss barrier {before:.3f} -> {after:.3f}")
        assert after < before


def test_errors_name_the_tensor():
    _, a, spec, _, b = planted(6)
    bad = dict(b)
    bad["2.weight"] = bad["2.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"tensor '2.weight': shape"):
        weight_matching(a, bad, spec)
    missing = {k: v for k, v in b.items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"other: tensor '0.bias'.*missing"):
        weight_matching(a, missing, spec)
    clash = PermutationSpec({"h": [("0.weight", 0), ("2.weight", 0)]})
    with pytest.raises(ValueError, match=r"permutation .h.: tensor .2.weight. axis 0 has 48 units, but 64"):
        weight_matching(a, b, clash)
    with pytest.raises(ValueError, match="perms"):
        apply_permutation(a, spec, {"hidden0": torch.arange(64)})
    with pytest.raises(ValueError, match="at least 2"):
        mlp_spec([("0.weight", "0.bias")])
