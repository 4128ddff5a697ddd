"""Extraction: a fine-tune's change from its base re-expressed as something
smaller that other tools load.

``extract_lora`` streams a base/fine-tune pair tensor by tensor and writes
each selected matrix's task vector, factored by truncated SVD, as a PEFT
LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "extract_lora": "lora", "LoraExtraction": "lora", "factor": "lora", "is_lora_target": "lora",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
