"""``ferrox extract METHOD ...``: one module per extraction method, each
writing a folder that other tools load (lora: a PEFT adapter)."""

from .. import _common
from . import lora

METHODS = (lora,)


def add_parser(sub, parent=None):
    return _common.add_group(sub, "extract", "extract a fine-tune's change from its base (lora: a PEFT LoRA adapter)",
                             METHODS)
