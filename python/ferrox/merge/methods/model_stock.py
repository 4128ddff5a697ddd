"""``model_stock`` (Jang et al. 2024): interpolate between the base and the
fine-tunes' average by t = k·cos θ / (1 + (k − 1)·cos θ), θ the mean pairwise
angle between the fine-tunes' task vectors; over the whole tensor or, with
``filter_wise``, per row. Where the denominator vanishes the base is kept.
As mergekit 0.1.5 (same order of operations: a float32 merge by ``model_stock``
gives its bits). A CPU merge runs the fused version in the Rust core
(``ferrox_core::merge::interp``: every norm and dot of the task vectors in one
float64 pass), whose t can differ from mergekit's in the last bits
(tests/mergekit_parity.py states the bound)."""

from .base import Param, TensorMethod


def model_stock(base, models, filter_wise: bool = False):
    import torch

    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
    else:
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    taus = [m - base for m in models]
    cosines = []
    for i, x in enumerate(taus):
        for y in taus[i + 1:]:
            norms = torch.norm(x, dim=-1) * torch.norm(y, dim=-1)
            cosines.append(((x * y).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(models)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (k * cos) / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(models) / k
    return (t * average + (1 - t) * base).reshape(shape)


def _model_stock_kernel(inputs, filter_wise):
    return model_stock(inputs.base, inputs.non_base, filter_wise=filter_wise)


def _model_stock_native(shape, filter_wise):
    # filter_wise: one t per vector along the last dimension (a 1-D tensor is one row)
    return dict(method="model_stock", row_len=shape[-1] if filter_wise and len(shape) > 1 else 0)


METHODS = [
    TensorMethod(
        "model_stock", "https://arxiv.org/abs/2403.19522", _model_stock_kernel,
        (Param("filter_wise", "flag", False, doc="one t per row (filter) instead of per tensor"),),
        base="required", min_inputs=3, shape_of_inputs="base_model and at least two other models",
        native=_model_stock_native,
    ),
]
