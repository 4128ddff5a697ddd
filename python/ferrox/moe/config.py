"""mergekit-moe's YAML config, read and checked: every key, its type and the
models it names (``ValueError`` naming the key otherwise).

mergekit 0.1.5's ``MoEMergeConfig``: ``base_model``, ``experts`` (each
``source_model``, ``positive_prompts``, ``negative_prompts``,
``noise_scale``, ``residual_scale``), ``gate_mode`` (default ``hidden``),
``dtype``, ``experts_per_token`` (default 2), ``shared_experts`` and
``architecture``. ferrox adds ``average_shared`` (Branch-Train-MiX: the
non-FFN tensors averaged over the experts instead of taken from the base)
and ``seed`` (mergekit draws random routers and noise from torch's global
RNG, unseeded). Unknown keys are refused, where pydantic would ignore them.
"""

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
            "average_shared", "seed")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
# hidden / hidden_last: each prompt's last-token state; hidden_avg: its mean over the prompt (mergekit's names)
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
# mergekit's dtype_from_name, less the integer/f64 outputs no MoE checkpoint uses
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class Expert:
    source_model: str
    positive_prompts: Tuple[str, ...] = ()
    negative_prompts: Tuple[str, ...] = ()
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


@dataclass
class MoEConfig:
    base_model: str
    experts: Tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None  # safetensors name (BF16, F16, F32); None: the base's config dtype
    experts_per_token: int = 2
    average_shared: bool = False
    seed: int = 0
    architecture: Optional[str] = None
    source: dict = field(default_factory=dict, repr=False)  # the YAML mapping
    text: Optional[str] = field(default=None, repr=False)  # the YAML file's text, when read from one

    @property
    def n_experts(self) -> int:
        return len(self.experts)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _model(key: str, value) -> str:
    """A local model folder or file; relative paths from the current directory, as mergekit resolves them."""
    if isinstance(value, dict):
        raise ValueError(f"{key}: only a local path is supported (mergekit's model/lora mapping is not)")
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{key}: expected a local model path, got {_kind(value)} {value!r}")
    if "+" in value and not os.path.exists(value):
        raise ValueError(f"{key}: {value!r} looks like mergekit's 'model+lora' form, which ferrox moe does not "
                         f"support; give a merged model folder")
    full = os.path.abspath(value)
    if not os.path.exists(full):
        if value.count("/") == 1 and not value.startswith((".", "/")):
            raise ValueError(f"{key}: {value!r} looks like a hub model id; ferrox never downloads, give a local folder")
        raise ValueError(f"{key}: no such model file or folder: {full}")
    return os.path.realpath(full)


def _prompts(key: str, value) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list):
        raise ValueError(f"{key}: expected a list of strings, got {_kind(value)}")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise ValueError(f"{key}[{i}]: expected a string, got {_kind(p)} {p!r}")
        if not p:
            raise ValueError(f"{key}[{i}]: empty prompt")
    return tuple(value)


def _finite(key: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number, got {_kind(value)} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{key}: expected a finite number, got {value}")
    return value


def _integer(key: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {_kind(value)} {value!r}")
    if not lo <= value < hi:
        raise ValueError(f"{key}: expected an integer in [{lo}, {hi}), got {value}")
    return value


def _expert(key: str, raw) -> Expert:
    if not isinstance(raw, dict):
        raise ValueError(f"{key}: expected a mapping with source_model, got {_kind(raw)}")
    for k in raw:
        if k not in EXPERT_KEYS:
            raise ValueError(f"{key}: unknown key {k!r} (known: {', '.join(EXPERT_KEYS)})")
    if "source_model" not in raw:
        raise ValueError(f"{key}.source_model is required")
    return Expert(_model(f"{key}.source_model", raw["source_model"]),
                  _prompts(f"{key}.positive_prompts", raw.get("positive_prompts")),
                  _prompts(f"{key}.negative_prompts", raw.get("negative_prompts")),
                  _finite(f"{key}.noise_scale", raw.get("noise_scale")),
                  _finite(f"{key}.residual_scale", raw.get("residual_scale")))


def parse_config(raw, *, allow_all_same: bool = False) -> MoEConfig:
    """A checked ``MoEConfig`` from the YAML mapping ``raw``. mergekit's
    ``is_bad_config`` checks are errors here too: experts_per_token in
    [1, n_experts]; with a prompt-based gate_mode, every expert has
    positive prompts and not all experts have the same prompts; not all
    experts the same model unless ``allow_all_same`` (mergekit's
    --i-understand-this-is-not-useful-without-training; as in mergekit,
    random gates skip both prompt and model checks)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a YAML mapping at the top level, got {_kind(raw)}")
    for k in raw:
        if k not in TOP_KEYS:
            raise ValueError(f"unknown config key {k!r} (known: {', '.join(TOP_KEYS)})")
    if "base_model" not in raw:
        raise ValueError("config: base_model is required")
    base = _model("base_model", raw["base_model"])
    experts = raw.get("experts")
    if not isinstance(experts, list) or not experts:
        raise ValueError(f"experts: expected a non-empty list of experts, got {_kind(experts)}")
    experts = tuple(_expert(f"experts[{i}]", e) for i, e in enumerate(experts))
    shared = raw.get("shared_experts")
    if shared is not None and shared != []:
        raise ValueError("shared_experts: the Mixtral output has no shared experts (mergekit writes them only for "
                         "Qwen2-MoE/DeepSeek outputs, which ferrox moe does not)")
    arch = raw.get("architecture")
    if arch is not None:
        # mergekit picks the output architectures whose name starts with it
        if not isinstance(arch, str) or not "mixtral".startswith(arch.lower()):
            raise ValueError(f"architecture: ferrox moe writes Mixtral only, got {arch!r}")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ValueError(f"gate_mode: expected one of {', '.join(GATE_MODES)}, got {_kind(mode)} {mode!r}")
    dtype = raw.get("dtype")
    if dtype is not None:
        name = dtype[len("torch."):] if isinstance(dtype, str) and dtype.startswith("torch.") else dtype
        if name not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {_kind(dtype)} {dtype!r}")
        dtype = DTYPES[name]
    k = _integer("experts_per_token", raw.get("experts_per_token", 2), 1, 2**31)
    if k > len(experts):
        raise ValueError(f"experts_per_token: {k} is more than the {len(experts)} experts listed")
    avg = raw.get("average_shared", False)
    if not isinstance(avg, bool):
        raise ValueError(f"average_shared: expected true or false, got {_kind(avg)} {avg!r}")
    seed = _integer("seed", raw.get("seed", 0), 0, 2**63)
    if mode in PROMPT_MODES:
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise ValueError(f"experts[{i}].positive_prompts: gate_mode {mode} needs positive prompts for "
                                 f"every expert (or use gate_mode: random)")
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if len(experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
            raise ValueError("experts: every expert has the same positive and negative prompts; the router could "
                             "not tell them apart")
        if not allow_all_same and len(experts) > 1 and all(e.source_model == experts[0].source_model for e in experts):
            raise ValueError("experts: every expert is the same model (the MoE would compute what it does, at more "
                             "cost); pass allow_all_same (--i-understand-this-is-not-useful-without-training) to "
                             "build it anyway, e.g. to train it afterwards")
    return MoEConfig(base, experts, mode, dtype, k, avg, seed, arch, source=raw)


def load_config(path, *, allow_all_same: bool = False) -> MoEConfig:
    """``parse_config`` of a YAML file."""
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    cfg = parse_config(raw, allow_all_same=allow_all_same)
    cfg.text = text
    return cfg
