"""Codebook weight quantization: 2^b codewords per tensor or per group of
similarly distributed rows, codes packed with ``ferrox.pack``.

``kmeans`` clusters values (scalar, optionally weighted, or d-dim vectors);
``quantize`` turns a 2-D weight into a ``CodebookTensor`` (see ``format``)
and ``dequantize`` decodes one back to dense in the original row order.
``save``/``load`` read and write a ``ferrox_format: codebook`` folder.
Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "CodebookTensor": "format", "save": "format", "load": "format",
    "kmeans": "cluster", "KMeansResult": "cluster",
    "quantize": "codec", "dequantize": "codec",
    "group_rows": "grouping", "row_statistics": "grouping",
    "CodebookLinear": "modules", "CodebookEmbedding": "modules", "apply_codebook": "modules", "fold_pairs": "modules",
    "learn_codebook": "joint", "capture_inputs": "joint",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
