"""``nearswap``: per element, take the other model's value where it is within
``t`` of the base's, and move toward it by t/|a − b| elsewhere:
w = clamp(t / max(|a − b|, 1e-6), 0, 1), merged = w·b + (1 − w)·a.
As mergekit 0.1.5 (same expression, so a float32 merge gives its bits)."""

from .base import REQUIRED, Param, TensorMethod


def nearswap(t: float, a, b):
    import torch

    absdiff = torch.abs(a - b)
    w = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


def _nearswap_kernel(inputs, t):
    return nearswap(t, inputs.base, inputs.non_base[0])


METHODS = [
    TensorMethod(
        "nearswap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", _nearswap_kernel,
        (Param("t", "number", REQUIRED, lo=0.0, doc="distance below which the other model's value is taken"),),
        base="required", min_inputs=2, max_inputs=2, shape_of_inputs="base_model and one other model",
    ),
]
