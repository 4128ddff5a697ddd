"""Merge configs: mergekit's YAML (the same keys mean the same thing) plus
ferrox's own names. Keys ferrox does not implement yet are refused by name,
never silently ignored.

Name mapping (mergekit -> paper): ``density`` is the kept fraction (the
Breadcrumbs paper's β, ``keep_frac``); ``gamma`` is the fraction of largest
outliers dropped first (the paper's γ, ``outlier_frac``). ferrox also reads
``keep_frac``/``outlier_frac`` and ``granularity: tensor | row`` (mergekit
ranks per tensor; the Breadcrumbs paper's code per row).
"""

import math
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from .. import dtypes
from .methods import MergeMethod, get_method

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "name"}
REFUSED_TOP = {"slices", "tokenizer_source", "tokenizer", "chat_template", "modules", "architecture"}
MODEL_KEYS = {"model", "parameters"}
GLOBAL_PARAMS = {"normalize", "rescale", "lambda", "granularity", "seed", "int8_mask"}
REFUSED_PARAMS = {"epsilon"}
ALIASES = {"keep_frac": "density", "outlier_frac": "gamma"}
PER_MODEL = {"weight", "density", "gamma"}
DTYPES = {dtypes.get(name).torch_name for name in dtypes.KERNEL_FLOATS}  # mergekit's names


class ConfigError(ValueError):
    """A merge config that ferrox cannot run as written."""


@dataclass
class ModelEntry:
    path: str
    params: Dict[str, float] = field(default_factory=dict)


@dataclass
class MergeConfig:
    method: MergeMethod
    base: Optional[str]
    models: List[ModelEntry]
    normalize: bool
    rescale: bool
    lam: float
    granularity: str
    seed: int
    dtype: Optional[str]
    out_dtype: Optional[str]
    source: dict
    #: mergekit's TIES mask dtype switch: read and checked, no numerical effect
    int8_mask: bool = False
    #: the YAML file it was read from (an input the output may not overwrite)
    config_path: Optional[str] = None

    @property
    def merge_base(self) -> Optional[str]:
        """The model task vectors are taken from: the base of a method that
        reads one. linear ignores a base as a base (mergekit's contract); its
        base_model is one of ``models`` and only donates config/tokenizer."""
        return self.base if self.method.needs_base else None

    def resolved(self) -> dict:
        """The config with every default filled in (written as provenance)."""
        return {
            "merge_method": self.method.name,
            "base_model": self.base,
            "models": [{"model": m.path, "parameters": dict(m.params)} for m in self.models],
            "parameters": {"normalize": self.normalize, "rescale": self.rescale, "lambda": self.lam,
                           "granularity": self.granularity, "seed": self.seed, "int8_mask": self.int8_mask},
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
        }


def _scalar(where: str, key: str, value):
    if isinstance(value, list):
        raise ConfigError(f"{where}: parameter {key!r} is a gradient list; ferrox does not support gradients yet")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: parameter {key!r} uses filters; ferrox does not support filtered parameters yet")
    return value


F32_MAX = 3.4028234663852886e38


def _kind(value) -> str:
    return "a string" if isinstance(value, str) else type(value).__name__


def _number(where: str, key: str, value) -> float:
    """A finite real number (YAML int or float; not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r} ({_kind(value)})")
    try:
        v = float(value)
    except OverflowError:
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    if abs(v) > F32_MAX:  # the merge computes in float32: this would be inf there
        raise ConfigError(f"{where}: {key} must be a finite number within float32's range, got {value!r}")
    return v


def _fraction(where: str, key: str, value) -> float:
    v = _number(where, key, value)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{where}: {key} must be a fraction in [0, 1], got {value!r}")
    return v


def _flag(where: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r} ({_kind(value)})")
    return value


def _seed(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: seed must be an integer, got {value!r} ({_kind(value)})")
    if not 0 <= value < 2**64:
        raise ConfigError(f"{where}: seed must be in [0, 2**64), got {value}")
    return value


def _choice(where: str, key: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}: {key} must be one of {sorted(allowed)}, got {value!r}")
    return value


def _params(where: str, raw, allowed) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: parameters must be a mapping, got {_kind(raw)}")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: parameter names must be strings, got {key!r}")
        if key in REFUSED_PARAMS:
            raise ConfigError(f"{where}: parameter {key!r} is not supported by ferrox yet")
        key = ALIASES.get(key, key)
        if key not in allowed:
            raise ConfigError(f"{where}: unknown parameter {key!r} (known: {sorted(allowed)})")
        out[key] = _scalar(where, key, value)
    return out


def _local_path(where: str, path, config_dir: Optional[str]) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigError(f"{where}: expected a local path, got {path!r}")
    full = path if os.path.isabs(path) else os.path.join(config_dir or os.getcwd(), path)
    if not os.path.exists(full):
        if "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
            raise ConfigError(f"{where}: {path!r} looks like a hub model id; ferrox never downloads, give a local folder")
        raise ConfigError(f"{where}: no such model file or folder: {full}")
    # realpath, not normpath: "link/../x" is what the OS opens, not a lexical "x".
    return os.path.realpath(full)


def _f32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: what the core's sum would be
        return math.copysign(math.inf, x)


def _f32_sum(values) -> float:
    """The weights' sum as the Rust core folds it (float32, in order)."""
    total = 0.0
    for v in values:
        total = _f32(total + _f32(v))
    return total


def parse_config(raw: dict, config_dir: Optional[str] = None) -> MergeConfig:
    """A checked ``MergeConfig``. Relative model paths are resolved from
    ``config_dir``, by default the current directory (as mergekit does; not
    the config file's folder)."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a YAML mapping at the top level")
    for key in raw:
        if key in REFUSED_TOP:
            raise ConfigError(f"config key {key!r} is not supported by ferrox yet")
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown config key {key!r} (known: {sorted(TOP_KEYS)})")
    if "merge_method" not in raw:
        raise ConfigError("config: merge_method is required")
    if not isinstance(raw["merge_method"], str):
        raise ConfigError(f"config: merge_method must be a method name, got {raw['merge_method']!r}")
    if "name" in raw and not isinstance(raw["name"], str):
        raise ConfigError(f"config: name must be a string, got {raw['name']!r}")
    try:
        method = get_method(raw["merge_method"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dtype, out_dtype = raw.get("dtype"), raw.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None:
            _choice("config", key, value, DTYPES)
    glob = _params("parameters", raw.get("parameters"), GLOBAL_PARAMS | PER_MODEL | set(ALIASES))
    base = raw.get("base_model")
    if method.needs_base and not base:
        raise ConfigError(f"config: merge_method {method.name!r} needs base_model")
    base = _local_path("base_model", base, config_dir) if base else None
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("config: models must be a non-empty list")
    raw_models = []
    for i, e in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(e, dict) or "model" not in e:
            raise ConfigError(f"{where}: expected a mapping with a 'model' key")
        for key in e:
            if key not in MODEL_KEYS:
                raise ConfigError(f"{where}: key {key!r} is not supported by ferrox yet")
        path = _local_path(f"{where}.model", e["model"], config_dir)
        for j, (_, other, _) in enumerate(raw_models):
            if os.path.samefile(path, other):
                raise ConfigError(f"{where}.model: {e['model']!r} is the same model as models[{j}] "
                                  f"({other}); mergekit refuses duplicate merge inputs, list each model once")
        raw_models.append((where, path, e.get("parameters")))
    base_listed = base is not None and any(os.path.samefile(p, base) for _, p, _ in raw_models)
    if base and not method.needs_base and not base_listed:
        # mergekit adds an unlisted base_model to the inputs, last, with the global parameters.
        raw_models.append(("base_model", base, None))
    models = []
    for where, path, model_params in raw_models:
        params = {k: v for k, v in glob.items() if k in PER_MODEL}
        params.update(_params(where, model_params, PER_MODEL))
        if method.needs_base and base and os.path.samefile(path, base):
            continue  # mergekit lets the base appear among the models; it carries no delta
        if "weight" not in params:
            if where == "base_model":
                raise ConfigError(f"base_model: {method.name} merges its base_model as one more input (as mergekit "
                                  f"does), so it needs a weight: list it under models with one, or set a global "
                                  f"weight under parameters")
            raise ConfigError(f"{where}: parameter 'weight' is required for {method.name}")
        params["weight"] = _number(where, "weight", params["weight"])
        for key in ("density", "gamma"):
            if key in params:
                params[key] = _fraction(where, key, params[key])
        models.append(ModelEntry(path, params))
    if not models:
        raise ConfigError("config: no models besides the base model")
    normalize = _flag("parameters", "normalize", glob.get("normalize", method.normalize))
    if normalize and not method.needs_base:
        weights = [m.params["weight"] for m in models]
        total = _f32_sum(weights)
        # The core would fall back to dividing by 1 here, mergekit to dividing by ~0 (inf/NaN): neither is a merge.
        if abs(total) < 1e-8:
            raise ConfigError(f"parameters: {method.name} with normalize: true divides by the sum of the weights, "
                              f"and the weights {weights} sum to {total:g}; set normalize: false or change the weights")
    granularity = _choice("parameters", "granularity", glob.get("granularity", "tensor"), {"tensor", "row"})
    return MergeConfig(
        method=method, base=base, models=models,
        normalize=normalize,
        rescale=_flag("parameters", "rescale", glob.get("rescale", method.rescale)),
        lam=_number("parameters", "lambda", glob.get("lambda", 1.0)),
        granularity=granularity, seed=_seed("parameters", glob.get("seed", 0)),
        dtype=dtype, out_dtype=out_dtype, source=raw,
        int8_mask=_flag("parameters", "int8_mask", glob.get("int8_mask", False)),
    )


#: Larger config files are refused (a merge config is a few KiB).
MAX_CONFIG_BYTES = 1 << 20


def load_config(path) -> MergeConfig:
    path = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError names the path
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {st.st_size} bytes is too large for a merge config (at most {MAX_CONFIG_BYTES})")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a merge config") from None
    try:
        cfg = parse_config(raw)  # relative model paths: from the current directory, as mergekit
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a merge config") from None
    cfg.config_path = os.path.abspath(path)
    return cfg
