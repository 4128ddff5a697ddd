"""Extraction: a fine-tune's change from its base re-expressed as something
smaller that other tools load.

``extract_lora`` streams a base/fine-tune pair tensor by tensor and writes
each selected matrix's task vector, factored by truncated SVD, as a PEFT
LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``);
``apply_lora`` does the reverse, a model with an adapter merged in, streamed
the same way (mergekit's ``model+lora`` inputs). Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "extract_lora": "lora", "LoraExtraction": "lora", "factor": "lora", "is_lora_target": "lora",
    "apply_lora": "apply", "read_adapter": "apply", "split_lora_ref": "apply",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
