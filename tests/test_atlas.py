"""aTLAS (learned anisotropic scaling of task vectors): identity at λ = 0,
the λ-gradient as a dot product with the task vector, recovery of planted
per-block coefficients, the exported state dict, and input validation."""

import pytest
import torch
import torch.nn.functional as F

from ferrox.merge import TaskVector
from ferrox.merge.atlas import ATLAS, fit_atlas, prediction_entropy, train_atlas

N_TASKS = 3


def mlp(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4),
    ).to(dtype)


def task_vectors(model, seed, scale=0.05, n=N_TASKS):
    """Random deltas small next to the weights (|w| ~ 0.25), as fine-tuning
    leaves them: the fit then stays in the near-quadratic region around θ0."""
    g = torch.Generator().manual_seed(seed)
    return [{k: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
            for _ in range(n)]


def inputs(seed, n=512, dtype=torch.float64):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def manual_parameters(model, tvs, coef, block_of):
    """θ0 + Σ_t λ[t, block(p)] τ_t, written out per parameter."""
    return {k: p.detach() + sum(coef[t, block_of[k]] * tv[k] for t, tv in enumerate(tvs))
            for k, p in model.named_parameters()}


def test_zero_coefficients_reproduce_the_base_exactly():
    base = mlp(0, torch.float32)
    x = inputs(1, dtype=torch.float32)
    want = base(x)
    atlas = ATLAS(base, task_vectors(base, 2))
    assert atlas.coefficients.shape == (N_TASKS, 6)
    assert torch.equal(atlas.coefficients, torch.zeros(N_TASKS, 6))
    assert torch.equal(atlas(x), want)
    assert [n for n, p in atlas.named_parameters() if p.requires_grad] == ["coef"]


@pytest.mark.parametrize("blocks", ["tensor", "isotropic", "layer"])
def test_coefficient_gradient_is_the_dot_product_with_the_task_vector(blocks):
    base = mlp(0)
    tvs = task_vectors(base, 1)
    if blocks == "layer":  # weight and bias of a layer share a coefficient
        blocks = {k: k.split(".")[0] for k, _ in base.named_parameters()}
    atlas = ATLAS(base, tvs, blocks=blocks)
    with torch.no_grad():
        atlas.coef.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(3))
    x, target = inputs(4, n=64), torch.randn(64, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    F.mse_loss(atlas(x), target).backward()

    # ∇θ L at θ(λ), from an ordinary backward pass through the merged weights.
    block_of = dict(zip(atlas.param_names, atlas.block_of_param))
    theta = {k: v.clone().requires_grad_(True)
             for k, v in manual_parameters(base, tvs, atlas.coef.detach(), block_of).items()}
    grads = torch.autograd.grad(F.mse_loss(torch.func.functional_call(base, theta, (x,)), target), list(theta.values()))
    want = torch.zeros_like(atlas.coef)
    for (k, _), grad in zip(theta.items(), grads):
        for t, tv in enumerate(tvs):
            want[t, block_of[k]] += (grad * tv[k]).sum()
    # float64 and a handful of summation-order differences: 1e-10 relative.
    torch.testing.assert_close(atlas.coef.grad, want, rtol=1e-10, atol=1e-14)

    def loss_of(coef):
        return F.mse_loss(torch.func.functional_call(atlas, {"coef": coef}, (x,)), target)

    assert torch.autograd.gradcheck(loss_of, (atlas.coef.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_planted_per_block_coefficients_are_recovered():
    base = mlp(0)
    tvs = task_vectors(base, 1)
    planted = torch.empty(N_TASKS, 6, dtype=torch.float64).uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(2))
    x = inputs(3)
    block_of = {k: b for b, (k, _) in enumerate(base.named_parameters())}
    with torch.no_grad():
        target = torch.func.functional_call(base, manual_parameters(base, tvs, planted, block_of), (x,))
        start_loss = F.mse_loss(base(x), target).item()

    def fit(blocks):
        atlas = ATLAS(base, tvs, blocks=blocks)
        lbfgs = torch.optim.LBFGS([atlas.coef], lr=1, max_iter=200, history_size=50, tolerance_grad=1e-14,
                                  tolerance_change=1e-20, line_search_fn="strong_wolfe")

        def relative_loss():  # relative to λ = 0, so LBFGS's tolerances see an O(1) loss
            lbfgs.zero_grad()
            loss = F.mse_loss(atlas(x), target) / start_loss
            loss.backward()
            return loss

        lbfgs.step(relative_loss)
        with torch.no_grad():
            return atlas.coefficients, F.mse_loss(atlas(x), target).item() / start_loss

    coef, loss = fit("tensor")
    assert (coef - planted).abs().max() < 1e-2
    assert loss < 1e-8
    # One coefficient per task vector cannot reach θ*: the planted scales
    # differ between blocks, so most of the displacement stays unexplained.
    iso_coef, iso_loss = fit("isotropic")
    assert iso_coef.shape == (N_TASKS, 1)
    assert iso_loss > 0.1


def test_train_atlas_fits_planted_coefficients_with_adam():
    base = mlp(0)
    tvs = task_vectors(base, 1)
    planted = torch.full((N_TASKS, 6), 0.5, dtype=torch.float64)
    planted[0, :3] = 1.2
    x = inputs(3, n=256)
    block_of = {k: b for b, (k, _) in enumerate(base.named_parameters())}
    with torch.no_grad():
        target = torch.func.functional_call(base, manual_parameters(base, tvs, planted, block_of), (x,))
    losses = train_atlas(ATLAS(base, tvs), [(x, target)], loss_fn=F.mse_loss, steps=300, lr=0.02)
    assert len(losses) == 300
    assert losses[-1] < 1e-2 * losses[0]


def test_entropy_objective_makes_predictions_more_confident():
    base = mlp(0)
    tvs = task_vectors(base, 1, scale=0.3)
    x = inputs(3, n=128)
    before = prediction_entropy(base(x)).item()
    atlas = fit_atlas(base, tvs, [(x,)], objective="entropy", steps=100, lr=0.05)
    with torch.no_grad():
        after = prediction_entropy(atlas(x)).item()
    assert after < before - 0.05


def test_prediction_entropy_of_known_distributions():
    uniform = torch.zeros(5, 4)
    certain = torch.tensor([[0.0, -1e4, -1e4]])
    assert prediction_entropy(uniform).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert prediction_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_state_dict_is_base_plus_scaled_task_vectors(dtype):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).to(dtype)
    finetuned = [{k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.state_dict().items()}
                 for _ in range(N_TASKS)]
    # TaskVector keeps the batch-norm statistics too; aTLAS leaves buffers alone.
    tvs = [TaskVector.from_state_dicts(base.state_dict(), f) for f in finetuned]
    blocks = {k: k.split(".")[0] for k, _ in base.named_parameters()}
    atlas = ATLAS(base, tvs, blocks=blocks)
    coef = torch.randn(N_TASKS, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        atlas.coef.copy_(coef)

    merged = atlas.merged_state_dict()

    assert merged.keys() == base.state_dict().keys()
    block_of = dict(zip(atlas.param_names, atlas.block_of_param))
    for k, v in base.state_dict().items():
        assert merged[k].dtype == v.dtype and not merged[k].requires_grad
        if k in block_of:
            want = (v.float() + sum(coef[t, block_of[k]] * tv.deltas[k] for t, tv in enumerate(tvs))).to(dtype)
            torch.testing.assert_close(merged[k], want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(merged[k], v)
    # The export runs the same model as the wrapper.
    base.eval()
    x = inputs(2, n=16, dtype=dtype)
    with torch.no_grad():
        want_out = atlas(x)
        reloaded = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).to(dtype)
        reloaded.load_state_dict(merged)
        reloaded.eval()
        assert torch.equal(reloaded(x), want_out)


def test_tied_parameters_are_one_block_and_exported_under_both_names():
    lin = torch.nn.Linear(4, 4, bias=False)
    base = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    tv = {"0.weight": torch.ones(4, 4), "2.weight": torch.ones(4, 4)}
    atlas = ATLAS(base, [tv])
    assert atlas.param_names == ("0.weight",)
    with torch.no_grad():
        atlas.coef.fill_(0.5)
    merged = atlas.merged_state_dict()
    assert torch.equal(merged["0.weight"], merged["2.weight"])
    torch.testing.assert_close(merged["0.weight"], lin.weight.detach() + 0.5)


def test_bad_task_vectors_are_refused_naming_the_tensor():
    base = mlp(0, torch.float32)
    good = task_vectors(base, 1, n=1)[0]
    with pytest.raises(ValueError, match=r"task_vectors: expected at least one"):
        ATLAS(base, [])
    with pytest.raises(ValueError, match=r"task_vectors\[1\]: tensor '2.weight' has shape \[16, 15\], the base model's has \[16, 16\]"):
        ATLAS(base, [good, {**good, "2.weight": torch.zeros(16, 15)}])
    with pytest.raises(ValueError, match=r"task_vectors\[0\]: parameter '4.bias' of the base model is missing"):
        ATLAS(base, [{k: v for k, v in good.items() if k != "4.bias"}])
    with pytest.raises(ValueError, match=r"task_vectors\[0\]: tensor 'head.weight' is not in the base model"):
        ATLAS(base, [{**good, "head.weight": torch.zeros(4, 16)}])
    with pytest.raises(ValueError, match=r"task_vectors\[0\]: tensor '0.bias' has dtype torch.int64"):
        ATLAS(base, [{**good, "0.bias": torch.zeros(16, dtype=torch.int64)}])
    with pytest.raises(TypeError, match=r"expected a torch.Tensor, got list"):
        ATLAS(base, [{**good, "0.bias": [0.0] * 16}])


def test_bad_blocks_and_training_arguments_are_refused():
    base = mlp(0, torch.float32)
    tvs = task_vectors(base, 1, n=1)
    with pytest.raises(ValueError, match=r"blocks: expected one of \('tensor', 'isotropic'\)"):
        ATLAS(base, tvs, blocks="layer")
    with pytest.raises(ValueError, match=r"blocks: parameter '4.bias' has no block"):
        ATLAS(base, tvs, blocks={k: "a" for k, _ in base.named_parameters() if k != "4.bias"})
    with pytest.raises(ValueError, match=r"blocks: 'x' is not a parameter"):
        ATLAS(base, tvs, blocks={**{k: "a" for k, _ in base.named_parameters()}, "x": "b"})
    with pytest.raises(ValueError, match=r"base: expected a module with parameters"):
        ATLAS(torch.nn.ReLU(), tvs)
    atlas = ATLAS(base, tvs)
    x = inputs(0, n=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"objective: expected one of"):
        train_atlas(atlas, [x], objective="kl")
    with pytest.raises(ValueError, match=r"loss_fn: the supervised objective needs"):
        train_atlas(atlas, [(x, x)])
    with pytest.raises(ValueError, match=r"steps: expected 1 <= steps"):
        train_atlas(atlas, [x], objective="entropy", steps=0)
    with pytest.raises(ValueError, match=r"lr: expected a positive learning rate, got -1"):
        train_atlas(atlas, [x], objective="entropy", lr=-1)
    with pytest.raises(ValueError, match=r"batches: expected at least one batch"):
        train_atlas(atlas, [], objective="entropy")
