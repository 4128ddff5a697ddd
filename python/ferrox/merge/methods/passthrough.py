"""``passthrough``: one input copied through, optionally times ``scale``
(per model, with filters: e.g. 0.5 on o_proj/down_proj). With ``slices``
(``layer_range``) it stacks layers of one or more models, a
"frankenmerge"; the stacking is planned in ``checkpoints.py``. As mergekit
0.1.5: ``x * scale`` in float32 gives its bits."""

from .base import Param, TensorMethod


def _passthrough_kernel(inputs):
    scale = inputs.per_model[0].get("scale") if inputs.per_model else None
    x = inputs.tensors[0]
    return x if scale is None else x * scale


METHODS = [
    TensorMethod("passthrough", "https://github.com/arcee-ai/mergekit", _passthrough_kernel,
                 (Param("scale", "number", None, per_model=True, doc="factor applied to the tensor (none: copied)"),),
                 base="input", min_inputs=1, max_inputs=1, shape_of_inputs="one model per slice"),
]
