"""BitDelta: a fine-tune stored as the signs of its weight delta plus one
scale per matrix (or per row), served off one base model.

``compress`` streams a base/fine-tune pair through the Rust core into a
BitDelta folder; ``restore`` gives the fine-tune back; ``BitDeltaLinear`` /
``apply_bitdelta`` run the compressed model with the 1-bit kernel (no dense
fine-tune weight in memory); ``MultiDeltaLinear`` serves several fine-tunes
in one batch; ``distill`` trains the scales against the fine-tune's outputs.
Names are imported on first use (compressing from files needs no torch
modules beyond what the checkpoint reader uses).
"""

from .._lazy import exports

_WHERE = {
    "compress": "codec", "restore": "codec", "CompressReport": "codec",
    "BitDelta": "format", "FORMAT": "format",
    "DEFAULT_EXCLUDE": "select", "Selection": "select",
    "BitDeltaLinear": "modules", "MultiDeltaLinear": "modules", "apply_bitdelta": "modules",
    "distill": "scales", "DistillResult": "scales", "model_output": "scales", "output_mse": "scales",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
