"""The one dtype table of the Python package: safetensors names (``"BF16"``),
their element sizes, torch dtypes and the names configs use
(``"bfloat16"``). torch is imported only when a torch dtype is asked for, so
header-only work (``ferrox inspect``, a streamed CPU merge) never pays for
it."""

from dataclasses import dataclass
from typing import Dict, Iterable


@dataclass(frozen=True)
class DType:
    #: safetensors spelling, the key of ``DTYPES``
    name: str
    itemsize: int
    #: torch / numpy / config spelling
    torch_name: str
    is_float: bool


DTYPES: Dict[str, DType] = {d.name: d for d in (
    DType("F64", 8, "float64", True),
    DType("F32", 4, "float32", True),
    DType("F16", 2, "float16", True),
    DType("BF16", 2, "bfloat16", True),
    DType("I64", 8, "int64", False),
    DType("I32", 4, "int32", False),
    DType("I16", 2, "int16", False),
    DType("I8", 1, "int8", False),
    DType("U8", 1, "uint8", False),
    DType("BOOL", 1, "bool", False),
)}

#: The float dtypes ferrox's kernels compute in (merges, compression).
KERNEL_FLOATS = ("F32", "F16", "BF16")
_BY_TORCH_NAME = {d.torch_name: d.name for d in DTYPES.values()}


def get(name: str) -> DType:
    """The entry of a safetensors dtype name; ``ValueError`` for others."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported (known: {', '.join(DTYPES)})") from None


def itemsize(name: str) -> int:
    return get(name).itemsize


def from_config_name(name: str) -> str:
    """``"bfloat16"`` -> ``"BF16"`` (the names of mergekit's ``dtype`` key)."""
    try:
        return _BY_TORCH_NAME[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported (known: {', '.join(_BY_TORCH_NAME)})") from None


def to_torch(name: str):
    import torch

    return getattr(torch, get(name).torch_name)


def from_torch(dtype) -> str:
    """``torch.bfloat16`` -> ``"BF16"``; ``ValueError`` for dtypes safetensors lacks."""
    text = str(dtype).replace("torch.", "")
    try:
        return _BY_TORCH_NAME[text]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file by ferrox") from None


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
