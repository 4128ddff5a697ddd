"""``ferrox compress METHOD ...``: one module per compression method, each
writing a ferrox output folder (``ferrox_format`` names the method) that
``ferrox restore`` and ``ferrox inspect`` read."""

from .. import _common
from . import bitdelta, codebook

METHODS = (bitdelta, codebook)


def add_parser(sub, parent=None):
    return _common.add_group(sub, "compress", "compress a model (bitdelta: a fine-tune as 1-bit deltas of its base; "
                             "codebook: k-means codebooks)",
                             METHODS)
