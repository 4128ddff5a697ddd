"""Weight matching (Git Re-Basin): a planted hidden-unit permutation is
recovered exactly, permuting keeps the network's function and its singular
values, and aligning independently trained MLPs lowers the loss at the
midpoint of their linear interpolation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrox.merge.permute import PermutationSpec, apply_permutation, invert_permutations, mlp_spec, weight_matching

WIDTHS = (20, 64, 48, 32, 5)  # input, three hidden layers, output


def sequential(widths):
    """Linear/ReLU chain: Linear i is child 2i, so its tensors are '2i.weight', '2i.bias'."""
    modules = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        modules += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*modules[:-1])


def linear_pairs(widths):
    return [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(len(widths) - 1)]


def random_state_dict(widths, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return {name: t.to(dtype) for name, t in sequential(widths).state_dict().items()}


def random_perms(widths, seed):
    """One random permutation per hidden layer, named as ``mlp_spec`` names them."""
    gen = torch.Generator().manual_seed(seed)
    return {f"hidden{i}": torch.randperm(width, generator=gen) for i, width in enumerate(widths[1:-1])}


def outputs(state_dict, widths, x):
    """The network's float32 outputs (bf16/f16 weights are exact in float32)."""
    model = sequential(widths)
    model.load_state_dict({name: t.float() for name, t in state_dict.items()})
    with torch.no_grad():
        return model(x)


def assert_state_dicts_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name, t in expected.items():
        assert actual[name].dtype == t.dtype, name
        assert torch.equal(actual[name], t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_permutation_is_recovered_exactly(seed, dtype):
    a = random_state_dict(WIDTHS, seed, dtype)
    spec = mlp_spec(a)
    planted = random_perms(WIDTHS, seed + 100)
    b = apply_permutation(a, spec, planted)
    assert all(not torch.equal(b[w], a[w]) for w, _ in linear_pairs(WIDTHS)), "the planted permutation moves nothing"

    perms = weight_matching(a, b, spec, seed=seed)

    assert perms.keys() == planted.keys()
    for name, sigma in planted.items():
        assert torch.equal(perms[name], torch.argsort(sigma)), name
    assert_state_dicts_equal(apply_permutation(b, spec, perms), a)
    x = torch.randn(256, WIDTHS[0], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(outputs(b, WIDTHS, x), outputs(a, WIDTHS, x), rtol=1e-6, atol=1e-6)


def test_spec_from_a_sequential_state_dict_equals_the_spec_from_its_layer_names():
    assert mlp_spec(random_state_dict(WIDTHS, 0)) == mlp_spec(linear_pairs(WIDTHS))
    assert mlp_spec(linear_pairs(WIDTHS)).axes["hidden1"] == (("2.weight", 0), ("2.bias", 0), ("4.weight", 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_permutation_keeps_the_singular_values(seed):
    a = random_state_dict(WIDTHS, seed)
    b = apply_permutation(a, mlp_spec(a), random_perms(WIDTHS, seed + 7))
    for weight, _ in linear_pairs(WIDTHS):
        assert not torch.equal(b[weight], a[weight]), weight
        sv_a, sv_b = torch.linalg.svdvals(a[weight].double()), torch.linalg.svdvals(b[weight].double())
        torch.testing.assert_close(sv_b, sv_a, rtol=1e-6, atol=0)


def test_identity_permutation_is_the_identity():
    a = random_state_dict(WIDTHS, 5, torch.bfloat16)
    a["buffer"] = torch.arange(3)  # not in the spec: passed through
    spec = mlp_spec(linear_pairs(WIDTHS))
    identity = {name: torch.arange(len(p)) for name, p in random_perms(WIDTHS, 0).items()}
    assert_state_dicts_equal(apply_permutation(a, spec, identity), a)
    assert all(torch.equal(p, identity[name]) for name, p in weight_matching(a, a, spec).items())


def test_spec_may_be_a_plain_dict_and_any_tensor_axis():
    # A transformer-style MLP block: hidden units are rows of gate/up and columns of down.
    gen = torch.Generator().manual_seed(0)
    a = {"mlp.gate_proj.weight": torch.randn(24, 8, generator=gen), "mlp.up_proj.weight": torch.randn(24, 8, generator=gen),
         "mlp.down_proj.weight": torch.randn(8, 24, generator=gen), "norm.weight": torch.randn(8, generator=gen)}
    spec = {"mlp": [("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0), ("mlp.down_proj.weight", -1)]}
    planted = {"mlp": torch.randperm(24, generator=gen)}
    b = apply_permutation(a, spec, planted)
    assert torch.equal(b["mlp.down_proj.weight"], a["mlp.down_proj.weight"][:, planted["mlp"]])
    assert b["norm.weight"] is a["norm.weight"]
    perms = weight_matching(a, b, spec)
    assert torch.equal(perms["mlp"], torch.argsort(planted["mlp"]))


@settings(max_examples=settings.default.max_examples * 2 // 5, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=3, max_size=6), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_apply_then_invert_gives_back_the_original(widths, seed, dtype):
    a = random_state_dict(widths, seed, dtype)
    spec = mlp_spec(a)
    perms = random_perms(widths, seed)
    assert_state_dicts_equal(apply_permutation(apply_permutation(a, spec, perms), spec, invert_permutations(perms)), a)


def test_matching_stops_after_a_sweep_that_changes_nothing(monkeypatch):
    import scipy.optimize

    solve, calls = scipy.optimize.linear_sum_assignment, []
    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", lambda *args, **kw: calls.append(1) or solve(*args, **kw))
    a = random_state_dict(WIDTHS, 8)
    # Two identical hidden units: swapping them ties with not swapping, and a
    # tie must not count as progress.
    a["0.weight"][1], a["0.bias"][1], a["2.weight"][:, 1] = a["0.weight"][0], a["0.bias"][0], a["2.weight"][:, 0]
    perms = weight_matching(a, a, mlp_spec(a))
    assert len(calls) == len(perms) == 3
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms.values())


def alignment_score(reference, other):
    """The weight-matching objective: Σ ⟨reference, other⟩ over all tensors."""
    return sum(float((t.double() * other[name].double()).sum()) for name, t in reference.items())


# Coordinate descent stops at a local optimum: with layers of a few units it
# can miss a planted permutation (e.g. widths [2, 2, 6, 2], seed 2), so the
# property for any widths is the fixed point, not the global optimum.
@settings(max_examples=settings.default.max_examples // 4, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=3, max_size=5), seed=st.integers(0, 2**16))
def test_matching_reaches_a_fixed_point_that_scores_no_worse(widths, seed):
    a, b = random_state_dict(widths, seed), random_state_dict(widths, seed + 1)
    spec = mlp_spec(a)
    aligned = apply_permutation(b, spec, weight_matching(a, b, spec, seed=seed))
    assert alignment_score(a, aligned) >= alignment_score(a, b) - 1e-9
    rematched = weight_matching(a, aligned, spec, seed=seed + 1)
    assert all(torch.equal(p, torch.arange(len(p))) for p in rematched.values())


# --- functional check: independently trained MLPs on scikit-learn's digits ---

DIGITS_WIDTHS = (64, 64, 64, 10)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def train(seed, x, y, steps=150):
    torch.manual_seed(seed)
    model = sequential(DIGITS_WIDTHS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):  # full batch: the init seed is the only difference between runs
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {name: t.detach() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(digits):
    # One thread: these matrices are tiny, and OpenMP workers spinning on a
    # busy 2-core machine made training 10-50x slower than running serially.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [train(seed, *digits) for seed in range(6)]
    finally:
        torch.set_num_threads(threads)


def loss(state_dict, x, y):
    return float(torch.nn.functional.cross_entropy(outputs(state_dict, DIGITS_WIDTHS, x), y))


def average(*state_dicts):
    return {name: sum(sd[name] for sd in state_dicts) / len(state_dicts) for name in state_dicts[0]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_lowers_the_midpoint_loss(seed, digits, trained):
    x, y = digits
    a, b = trained[2 * seed], trained[2 * seed + 1]
    spec = mlp_spec(a)
    aligned = apply_permutation(b, spec, weight_matching(a, b, spec, seed=seed))
    assert loss(aligned, x, y) == pytest.approx(loss(b, x, y), rel=1e-5)  # same function
    for weight, _ in linear_pairs(DIGITS_WIDTHS):
        torch.testing.assert_close(torch.linalg.svdvals(aligned[weight].double()),
                                   torch.linalg.svdvals(b[weight].double()), rtol=1e-6, atol=0)

    ends = (loss(a, x, y) + loss(b, x, y)) / 2
    before, after = loss(average(a, b), x, y), loss(average(a, aligned), x, y)
    print(f"seed {seed}: ends {ends:.4f}, midpoint loss {before:.4f} -> {after:.4f}, "
          f"barrier {before - ends:.4f} -> {after - ends:.4f}")
    assert after < before
    assert after - ends < 0.5 * (before - ends)


def test_matching_three_models_beats_naive_averaging(digits, trained):
    x, y = digits
    a, b, c = trained[0], trained[2], trained[4]
    spec = mlp_spec(a)
    aligned = [apply_permutation(m, spec, weight_matching(a, m, spec)) for m in (b, c)]
    naive, matched = loss(average(a, b, c), x, y), loss(average(a, *aligned), x, y)
    print(f"3-model average loss {naive:.4f} -> {matched:.4f} after matching")
    assert matched < naive


# --- bad input ---

def planted_pair():
    a = random_state_dict(WIDTHS, 6)
    return a, apply_permutation(a, mlp_spec(a), random_perms(WIDTHS, 6))


def without(state_dict, name):
    return {k: v for k, v in state_dict.items() if k != name}


def replaced(state_dict, name, tensor):
    return {**state_dict, name: tensor}


SPEC = mlp_spec(linear_pairs(WIDTHS))
A, B = planted_pair()

MATCHING_ERRORS = [
    ((A, without(B, "0.bias"), SPEC), r"other_state_dict: tensor '0\.bias' \(moved by permutation 'hidden0'\) is missing"),
    ((without(A, "0.bias"), B, SPEC), r"reference_state_dict: tensor '0\.bias' .* is missing"),
    ((A, replaced(B, "2.weight", B["2.weight"][:, :-1]), SPEC),
     r"tensor '2\.weight' axis 1: size 63 in other_state_dict, expected 64"),
    ((A, replaced(B, "2.bias", B["2.bias"][None]), SPEC),
     r"tensor '2\.bias': shape \[1, 48\] in other_state_dict, expected \[48\]"),
    ((A, B, PermutationSpec({"h": [("0.weight", 0), ("2.weight", 0)]})),
     r"permutation 'h': tensor '2\.weight' axis 0 has size 48, expected 64 like tensor '0\.weight' axis 0"),
    ((A, B, {"h": [("0.bias", 1)]}), r"axis 1 of tensor '0\.bias', expected an axis in \[-1, 1\) for shape \[64\]"),
    ((A, B, {"h": [("0.weight", 0), ("0.bias", 0)], "g": [("0.weight", -2)]}),
     r"tensor '0\.weight' axis 0 is moved by both 'h' and 'g'"),
    ((replaced(A, "0.bias", A["0.bias"].long()), B, SPEC), r"reference_state_dict: tensor '0\.bias' has dtype torch\.int64"),
]


@pytest.mark.parametrize("args, message", MATCHING_ERRORS)
def test_weight_matching_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        weight_matching(*args)


def test_max_iter_must_be_positive():
    with pytest.raises(ValueError, match=r"max_iter: expected a positive integer, got 0"):
        weight_matching(A, B, SPEC, max_iter=0)


def test_a_malformed_spec_is_rejected():
    with pytest.raises(ValueError, match=r"axes\['h'\]: expected \(tensor name, axis\) pairs, got '0\.weight'"):
        PermutationSpec({"h": ["0.weight"]})
    with pytest.raises(ValueError, match=r"permutation 'h' moves no tensor axis"):
        PermutationSpec({"h": []})
    with pytest.raises(ValueError, match=r"layers: expected at least 2 Linear layers .* got 1"):
        mlp_spec([("0.weight", "0.bias")])
    with pytest.raises(ValueError, match=r"layers: tensor '1\.weight' \(shape \[64\]\) is not a Linear weight"):
        mlp_spec({**A, "1.weight": torch.ones(64)})  # a LayerNorm between the Linears


PERMS = random_perms(WIDTHS, 0)
APPLY_ERRORS = [
    ((A, SPEC, without(PERMS, "hidden1")), r"perms: expected exactly .* missing \['hidden1'\], unknown \[\]"),
    ((A, SPEC, {**PERMS, "extra": torch.arange(3)}), r"missing \[\], unknown \['extra'\]"),
    ((A, SPEC, {**PERMS, "hidden0": torch.arange(63)}),
     r"perms\['hidden0'\]: expected a 1-D integer tensor holding each of 0\.\.63 once"),
    ((A, SPEC, {**PERMS, "hidden0": torch.zeros(64, dtype=torch.long)}), r"perms\['hidden0'\]"),
    ((A, SPEC, {**PERMS, "hidden0": torch.arange(64.0)}), r"perms\['hidden0'\].*dtype torch\.float32"),
    ((without(A, "4.weight"), SPEC, PERMS), r"state_dict: tensor '4\.weight' \(moved by permutation 'hidden1'\) is missing"),
]


@pytest.mark.parametrize("args, message", APPLY_ERRORS)
def test_apply_permutation_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        apply_permutation(*args)
