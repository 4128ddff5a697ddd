"""Merge configs: mergekit's YAML (the same keys mean the same thing) plus
ferrox's own names. Keys ferrox does not implement yet are refused by name,
never silently ignored.

Name mapping (mergekit -> paper): ``density`` is the kept fraction (the
Breadcrumbs paper's β, ``keep_frac``); ``gamma`` is the fraction of largest
outliers dropped first (the paper's γ, ``outlier_frac``). ferrox also reads
``keep_frac``/``outlier_frac`` and ``granularity: tensor | row`` (mergekit
ranks per tensor; the Breadcrumbs paper's code per row).
"""

import os
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .. import dtypes
from .methods import MergeMethod, get_method
from .methods.base import F32_MAX  # noqa: F401 (re-exported)
from .methods.base import _kind, check_choice, check_flag, check_integer, check_number
from .settings import Setting, layer_index, layer_t, parse_setting
from .tokenizer import Ref, TokenizerSpec, check_chat_template, parse_tokenizer

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "name",
            "tokenizer_source", "tokenizer", "chat_template"}
SLICE_KEYS = {"sources", "parameters"}
REFUSED_SLICE_KEYS = {"base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
REFUSED_TOP = {"modules", "architecture"}
MODEL_KEYS = {"model", "parameters"}
REFUSED_PARAMS: set = set()
#: ferrox's names for mergekit's (read where the method has the mergekit name)
ALIASES = {"keep_frac": "density", "outlier_frac": "gamma"}
DTYPES = {dtypes.get(name).torch_name for name in dtypes.KERNEL_FLOATS}  # mergekit's names

class ConfigError(ValueError):
    """A merge config that ferrox cannot run as written."""


@dataclass
class ModelEntry:
    path: str
    #: the per-model parameters as given (checked; defaults are the method's)
    params: Dict[str, Any] = field(default_factory=dict)
    #: the input a method with a base policy "required"/"optional" treats as its base
    is_base: bool = False
    #: the per-model settings in mergekit's precedence (the model's own, then the global ones)
    settings: Tuple[Dict[str, Setting], ...] = ()
    #: where in the config it was listed ("models[1]")
    where: str = ""
    #: a PEFT LoRA adapter folder applied to the model while streaming (mergekit's ``model+lora``)
    lora: Optional[str] = None

    @property
    def ref(self) -> Ref:
        return Ref(self.path, self.lora)


@dataclass
class SliceSource:
    """One source of an output slice: layers [start, end) of ``models[model]``."""
    model: int
    start: int
    end: int
    #: the source's own per-model settings
    settings: Dict[str, Setting]
    where: str
    is_base: bool = False


@dataclass
class SliceEntry:
    """One output slice (mergekit's ``slices[i]``): its sources' layers,
    merged offset by offset, and the slice's own parameter settings."""
    sources: List[SliceSource]
    settings: Dict[str, Setting]
    where: str

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start

    @property
    def base_index(self) -> Optional[int]:
        return next((i for i, s in enumerate(self.sources) if s.is_base), None)


@dataclass
class MergeConfig:
    method: MergeMethod
    base: Optional[str]
    #: the inputs in mergekit's order: the listed models, then base_model when
    #: unlisted (except for methods that take task vectors from it)
    models: List[ModelEntry]
    #: the method's global parameters, every default filled in
    params: Dict[str, Any]
    dtype: Optional[str]
    out_dtype: Optional[str]
    source: dict
    #: the YAML file it was read from (an input the output may not overwrite)
    config_path: Optional[str] = None
    #: the global settings of shared parameters given in the config (others: defaults)
    shared_settings: Dict[str, Setting] = field(default_factory=dict)
    #: some setting is a gradient or filters: parameters are resolved per tensor
    varying: bool = False
    #: the reference model's layer count (gradients' t); set by merge_checkpoints
    num_layers: Optional[int] = None
    #: ``slices`` (layer stacking); ``models`` then holds each distinct source model once
    slices: Optional[List[SliceEntry]] = None
    #: the global settings of per-model parameters (slices' last scope)
    model_settings: Dict[str, Setting] = field(default_factory=dict)
    #: the LoRA adapter of ``base_model`` (``base_model: model+lora``)
    base_lora: Optional[str] = None
    #: ``tokenizer_source`` / the ``tokenizer:`` block (None: the donor's tokenizer copied)
    tokenizer: Optional[TokenizerSpec] = None
    #: ``chat_template`` as given (a name, ``auto`` or Jinja text)
    chat_template: Optional[str] = None

    @property
    def base_ref(self) -> Optional[Ref]:
        return Ref(self.base, self.base_lora) if self.base else None

    # Generalized task arithmetic's global parameters, by their old names.
    normalize = property(lambda self: self.params.get("normalize", False))
    rescale = property(lambda self: self.params.get("rescale", False))
    lam = property(lambda self: self.params.get("lambda", 1.0))
    granularity = property(lambda self: self.params.get("granularity", "tensor"))
    int8_mask = property(lambda self: self.params.get("int8_mask", False))

    @property
    def seed(self) -> int:
        return self.params.get("seed", 0)

    @seed.setter
    def seed(self, value: int) -> None:
        if self.method.param("seed") is not None:  # deterministic methods have no seed to set
            self.params["seed"] = value
            if "seed" in self.shared_settings:  # a per-tensor resolution reads the settings
                self.shared_settings["seed"] = Setting("const", value, self.method.param("seed"))

    @property
    def merge_base(self) -> Optional[str]:
        """The model task vectors are taken from outside the inputs: the base of
        a GTA method that reads one. linear ignores a base as a base (mergekit's
        contract); its base_model is one of ``models`` and only donates
        config/tokenizer. A torch method's base is one of ``models`` too
        (``is_base``)."""
        return self.base if self.method.base_policy == "origin" else None

    @property
    def base_index(self) -> Optional[int]:
        """Position of the base among ``models`` (torch methods), else None."""
        return next((i for i, m in enumerate(self.models) if m.is_base), None)

    def tensor_t(self, tensor_name: str) -> float:
        """mergekit's gradient position of a tensor: its layer's, 0 outside the layers."""
        i = layer_index(tensor_name)
        if i is None:
            return 0.0
        if self.num_layers is None:
            raise ConfigError(f"tensor {tensor_name!r}: a gradient needs the model's layer count "
                              f"(num_hidden_layers); set MergeConfig.num_layers")
        if i >= self.num_layers:
            raise ConfigError(f"tensor {tensor_name!r}: layer {i} is past the model's {self.num_layers} layers "
                              f"(num_hidden_layers in config.json)")
        return layer_t(i, self.num_layers)

    def tensor_params(self, tensor_name: str, t: Optional[float] = None,
                      input_names: Optional[List[str]] = None) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """The global parameters and each non-base model's per-model ones for
        one tensor, gradients and filters resolved as mergekit does: ``t``
        from the tensor's layer (``tensor_t``) unless given; filters of a
        model's parameters match ``input_names[i]`` (that model's input
        tensor; by default ``tensor_name``)."""
        if not self.varying:
            return self.params, [m.params for m in self.models if not m.is_base]
        if t is None:
            t = self.tensor_t(tensor_name) if self._needs_t() else 0.0
        non_base = [m for m in self.models if not m.is_base]
        names = input_names if input_names is not None else [tensor_name] * len(non_base)
        return self._resolve((self.shared_settings,), [m.settings for m in non_base], tensor_name, names, t,
                             [m.where for m in non_base])

    def slice_params(self, sl: SliceEntry, tensor_name: str, input_names: List[str],
                     t: float) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """``tensor_params`` for one tensor of a slice: mergekit's precedence is
        the source's settings, then the slice's, then the global ones."""
        shared_chain = (sl.settings, self.shared_settings)
        chains = [(src.settings, sl.settings, self.model_settings) for src in sl.sources if not src.is_base]
        names = [n for n, src in zip(input_names, sl.sources) if not src.is_base]
        return self._resolve(shared_chain, chains, tensor_name, names, t, [src.where for src in sl.sources
                                                                          if not src.is_base])

    def _resolve(self, shared_chain, chains, tensor_name, input_names, t, wheres):
        shared = {}
        for p in self.method.params:
            if p.per_model:
                continue
            v = None
            for scope in shared_chain:
                if p.name in scope:
                    v = scope[p.name].evaluate(tensor_name, t)
                    if v is not None:
                        break
            if v is None and p.required:
                raise ConfigError(f"parameters: no filter of {p.name!r} matches tensor {tensor_name!r}, and "
                                  f"{self.method.name} requires it (add a '- value: ...' fallback)")
            if v is None:  # unset: the config's value (a --random-seed lands there); a filter missed: the default
                v = p.default if any(p.name in sc for sc in shared_chain) else self.params.get(p.name, p.default)
            shared[p.name] = v
        per_model = []
        for chain, name, where in zip(chains, input_names, wheres):
            params = {}
            for p in self.method.params:
                if not p.per_model:
                    continue
                v = None
                for scope in chain:
                    if p.name in scope:
                        v = scope[p.name].evaluate(name, t)
                        if v is not None:
                            break
                if v is not None:
                    params[p.name] = v
                elif p.required:
                    raise ConfigError(f"{where}: no filter of {p.name!r} matches tensor {name!r}, and "
                                      f"{self.method.name} requires it (add a '- value: ...' fallback)")
            per_model.append(params)
        filled = [{p.name: pm.get(p.name, p.default) for p in self.method.params if p.per_model} for pm in per_model]
        try:
            self.method.check_params(shared, filled)
        except ValueError as e:
            raise ConfigError(f"tensor {tensor_name!r} (t={t:g}): {e}") from None
        return shared, per_model

    def _needs_t(self) -> bool:
        return any(s.varies_with_t for s in self.shared_settings.values()) or any(
            s.varies_with_t for m in self.models for sc in m.settings for s in sc.values())

    def resolved(self) -> dict:
        """The config with every default filled in (written as provenance)."""
        if self.slices is not None:
            return self._with_tokenizer({
                "merge_method": self.method.name,
                "base_model": str(self.base_ref) if self.base else None,
                "slices": [{"sources": [{"model": str(self.models[s.model].ref), "layer_range": [s.start, s.end],
                                         "parameters": {k: v.raw() for k, v in s.settings.items()}}
                                        for s in sl.sources],
                            "parameters": {k: v.raw() for k, v in sl.settings.items()}} for sl in self.slices],
                "parameters": dict(self.params),
                "dtype": self.dtype,
                "out_dtype": self.out_dtype,
            })
        return self._with_tokenizer({
            "merge_method": self.method.name,
            "base_model": str(self.base_ref) if self.base else None,
            "models": [{"model": str(m.ref), "parameters": dict(m.params)} for m in self.models],
            "parameters": dict(self.params),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
        })

    def _with_tokenizer(self, out: dict) -> dict:
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.raw()
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out


def _config_error(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _number(where: str, key: str, value) -> float:
    return _config_error(check_number, where, key, value)


def _flag(where: str, key: str, value) -> bool:
    return _config_error(check_flag, where, key, value)


def _seed(where: str, value) -> int:
    return _config_error(check_integer, where, "seed", value, 0, 2**64)


def _choice(where: str, key: str, value, allowed) -> str:
    return _config_error(check_choice, where, key, value, allowed)


def _params(where: str, raw, method: MergeMethod) -> Dict[str, Setting]:
    """A parameters mapping: names checked against the method's declared
    parameters (ferrox's aliases read), each value a checked ``Setting``
    (scalar, gradient list or filters)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: parameters must be a mapping, got {_kind(raw)}")
    known = {p.name for p in method.params}
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: parameter names must be strings, got {key!r}")
        if key in REFUSED_PARAMS:
            raise ConfigError(f"{where}: parameter {key!r} is not supported by ferrox yet")
        if ALIASES.get(key) in known:
            key = ALIASES[key]
        if key not in known:
            raise ConfigError(f"{where}: unknown parameter {key!r} for {method.name} (known: {sorted(known)})")
        out[key] = _config_error(parse_setting, where, key, value, method.param(key))
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


def _model_ref(where: str, value, config_dir: Optional[str]) -> Ref:
    """A model reference: a local model, or mergekit's ``model+lora`` (a PEFT
    LoRA adapter folder applied to it). An existing path with a '+' in its
    name is taken as a model (mergekit would split it)."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{where}: expected a local path, got {value!r}")
    full = value if os.path.isabs(value) else os.path.join(config_dir or os.getcwd(), value)
    if "+" not in value or os.path.exists(full):
        return Ref(_local_path(where, value, config_dir))
    chunks = value.split("+")
    if len(chunks) != 2 or not all(chunks):
        raise ConfigError(f"{where}: {value!r} is neither a path nor MODEL+LORA (mergekit's syntax: one '+' "
                          f"between the model and the LoRA adapter folder)")
    model = _local_path(where, chunks[0], config_dir)
    lora = chunks[1]
    lora_full = lora if os.path.isabs(lora) else os.path.join(config_dir or os.getcwd(), lora)
    if not os.path.isdir(lora_full):
        raise ConfigError(f"{where}: no such LoRA adapter folder: {lora_full} (in {value!r})")
    if not os.path.isfile(os.path.join(lora_full, "adapter_config.json")):
        raise ConfigError(f"{where}: {lora_full} has no adapter_config.json; the part after '+' must be a PEFT "
                          f"LoRA adapter folder (in {value!r})")
    return Ref(model, os.path.realpath(lora_full))


def _tokenizer_keys(raw: dict, config_dir: Optional[str]):
    """(tokenizer spec, chat template) of a config, checked."""
    spec = _config_error(parse_tokenizer, raw, lambda where, v: _model_ref(where, v, config_dir))
    template = raw.get("chat_template")
    if template is not None:
        template = _config_error(check_chat_template, template)
    return spec, template


def _check_token_models(spec: Optional[TokenizerSpec], refs: List[Ref]) -> None:
    """mergekit needs a token's source model among the inputs (its vocabulary tensors come from them)."""
    if spec is None:
        return
    for tok, t in spec.tokens.items():
        if t.source.model is not None and not any(t.source.model.same(r) for r in refs):
            raise ConfigError(f"tokenizer.tokens[{tok!r}].source: {t.source.model} is not one of the merge's "
                              f"models; a token's row must come from an input")


def parse_config(raw: dict, config_dir: Optional[str] = None) -> MergeConfig:
    """A checked ``MergeConfig``. Relative model paths are resolved from
    ``config_dir``, by default the current directory (as mergekit does; not
    the config file's folder). Parameters are checked against the method's
    declarations in the registry (``MergeMethod.params``)."""
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
    method = _config_error(get_method, raw["merge_method"])
    if "slices" in raw and method.in_core:
        raise ConfigError(f"config key 'slices' is not supported by ferrox yet for {method.name} (slices run the "
                          f"torch methods: passthrough, slerp, ...; list whole models under models instead)")
    if ("slices" in raw) == ("models" in raw):
        raise ConfigError("config: give exactly one of models and slices (as mergekit)")
    dtype, out_dtype = raw.get("dtype"), raw.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None:
            _choice("config", key, value, DTYPES)
    glob = _params("parameters", raw.get("parameters"), method)
    base = raw.get("base_model")
    if method.needs_base and not base:
        raise ConfigError(f"config: merge_method {method.name!r} needs base_model")
    base_ref = _model_ref("base_model", base, config_dir) if base else None
    tokenizer, chat_template = _tokenizer_keys(raw, config_dir)
    if "slices" in raw:
        cfg = _parse_sliced(raw, method, glob, base_ref, dtype, out_dtype, config_dir)
        _check_token_models(tokenizer, [m.ref for m in cfg.models])
        cfg.tokenizer, cfg.chat_template = tokenizer, chat_template
        return cfg
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
        path = _model_ref(f"{where}.model", e["model"], config_dir)
        for j, (_, other, _) in enumerate(raw_models):
            if path.same(other):
                raise ConfigError(f"{where}.model: {e['model']!r} is the same model as models[{j}] "
                                  f"({other}); mergekit refuses duplicate merge inputs, list each model once")
        raw_models.append((where, path, e.get("parameters")))
    policy = method.base_policy
    base_listed = base_ref is not None and any(p.same(base_ref) for _, p, _ in raw_models)
    if base_ref and policy != "origin" and not base_listed:
        # mergekit adds an unlisted base_model to the inputs, last, with the global parameters.
        raw_models.append(("base_model", base_ref, None))
    per_model = [p for p in method.params if p.per_model]
    glob_model = {k: v for k, v in glob.items() if method.param(k).per_model}
    models = []
    for where, ref, model_params in raw_models:
        given = _params(where, model_params, method)
        path = ref.path
        is_base = base_ref is not None and ref.same(base_ref)
        if is_base and policy == "origin":
            continue  # mergekit lets the base appear among the models; it carries no delta
        if is_base and policy in ("required", "optional"):
            if given:
                raise ConfigError(f"{where}: parameter {sorted(given)[0]!r} does not apply to the base model of "
                                  f"{method.name} (mergekit reads per-model parameters of the other models only)")
            models.append(ModelEntry(path, {}, is_base=True, lora=ref.lora))
            continue
        for key in given:
            if not method.param(key).per_model:
                raise ConfigError(f"{where}: parameter {key!r} of {method.name} is global; set it under the "
                                  f"top-level parameters")
        for p in per_model:
            if p.required and p.name not in given and p.name not in glob_model:
                if where == "base_model":
                    raise ConfigError(f"base_model: {method.name} merges its base_model as one more input (as "
                                      f"mergekit does), so it needs a {p.name}: list it under models with one, "
                                      f"or set a global {p.name} under parameters")
                raise ConfigError(f"{where}: parameter {p.name!r} is required for {method.name}")
        # mergekit's precedence: the model's own setting, then the global one (also where a filter misses).
        chain = (given, glob_model)
        params = {}
        for p in per_model:
            s = next((sc[p.name] for sc in chain if p.name in sc), None)
            if s is not None:
                params[p.name] = s.value if s.constant else s.raw()
        models.append(ModelEntry(path, params, settings=chain, where=where, lora=ref.lora))
    if not any(not m.is_base for m in models):
        raise ConfigError("config: no models besides the base model")
    _config_error(method.check_inputs, len(models), any(m.is_base for m in models))
    shared, shared_settings = {}, {}
    for p in method.params:
        if p.per_model:
            continue
        if p.name in glob:
            shared_settings[p.name] = glob[p.name]
            shared[p.name] = glob[p.name].value if glob[p.name].constant else glob[p.name].raw()
        elif p.required:
            raise ConfigError(f"parameters: parameter {p.name!r} is required for {method.name}")
        else:
            shared[p.name] = p.default
    varying = bool(shared_settings and not all(s.constant for s in shared_settings.values())) or any(
        not s.constant for m in models for sc in m.settings for s in sc.values())
    if not varying:
        defaults = [{p.name: m.params.get(p.name, p.default) for p in per_model} for m in models if not m.is_base]
        _config_error(method.check_params, shared, defaults)
    _check_token_models(tokenizer, [m.ref for m in models] + ([base_ref] if base_ref else []))
    return MergeConfig(method=method, base=base_ref.path if base_ref else None, models=models, params=shared,
                       dtype=dtype, out_dtype=out_dtype, source=raw, shared_settings=shared_settings,
                       varying=varying, base_lora=base_ref.lora if base_ref else None, tokenizer=tokenizer,
                       chat_template=chat_template)


def model_num_layers(path: str, names=None) -> Optional[int]:
    """A model's layer count as mergekit reads it (config.json's
    num_hidden_layers), else one past the largest layer index in its tensor
    names (``names``, or read from the checkpoint's header; None when it has
    no layers)."""
    import json

    from .. import checkpoint as ckpt

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            n = json.load(f).get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    if names is None:
        names = [t.name for t in ckpt.read_checkpoint(path).tensors]
    found = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(found) + 1 if found else None


def _layer_range(where: str, value, n_layers: Optional[int]) -> Tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise ConfigError(f"{where}.layer_range: expected [start, end] (two integers, end exclusive), got {value!r}")
    start, end = value
    if not 0 <= start < end:
        raise ConfigError(f"{where}.layer_range: expected 0 <= start < end, got {list(value)}")
    if n_layers is None:
        raise ConfigError(f"{where}.model: has no layers (no num_hidden_layers in config.json, no "
                          f"'layers.N.' tensors), so layer_range cannot select any")
    if end > n_layers:
        raise ConfigError(f"{where}.layer_range: {list(value)} ends past the model's {n_layers} layers")
    return start, end


def _parse_sliced(raw, method, glob, base, dtype, out_dtype, config_dir) -> "MergeConfig":
    """mergekit's ``slices``: each output slice's sources (same layer count),
    merged layer offset by layer offset, the outputs stacked in order."""
    entries = raw["slices"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError("slices: expected a non-empty list of slices (each with sources)")
    paths: List[Ref] = []
    layers: Dict[str, Optional[int]] = {}
    slices = []
    for i, e in enumerate(entries):
        where = f"slices[{i}]"
        if not isinstance(e, dict) or "sources" not in e:
            raise ConfigError(f"{where}: expected a mapping with a 'sources' list")
        for key in e:
            if key in REFUSED_SLICE_KEYS:
                raise ConfigError(f"{where}: key {key!r} is not supported by ferrox yet")
            if key not in SLICE_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r} (known: {sorted(SLICE_KEYS)})")
        srcs = e["sources"]
        if not isinstance(srcs, list) or not srcs:
            raise ConfigError(f"{where}.sources: expected a non-empty list of sources")
        sources = []
        for j, src in enumerate(srcs):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{at}: expected a mapping with 'model' and 'layer_range'")
            for key in src:
                if key not in SOURCE_KEYS:
                    raise ConfigError(f"{at}: unknown key {key!r} (known: {sorted(SOURCE_KEYS)})")
            ref = _model_ref(f"{at}.model", src["model"], config_dir)
            path = ref.path
            idx = next((k for k, q in enumerate(paths) if q.same(ref)), None)
            if idx is None:
                idx = len(paths)
                paths.append(ref)
                layers[path] = model_num_layers(path)
            if any(s.model == idx for s in sources):
                raise ConfigError(f"{at}.model: {src['model']!r} is already a source of {where}; mergekit refuses "
                                  f"duplicate merge inputs")
            start, end = _layer_range(at, src["layer_range"], layers[paths[idx].path])
            is_base = (base is not None and method.base_policy in ("required", "optional")
                       and ref.same(base))
            given = _params(at, src.get("parameters"), method)
            for key in given:
                if not method.param(key).per_model:
                    raise ConfigError(f"{at}: parameter {key!r} of {method.name} is global; set it under the "
                                      f"slice's or the top-level parameters")
                if is_base:
                    raise ConfigError(f"{at}: parameter {key!r} does not apply to the base model of {method.name}")
            sources.append(SliceSource(idx, start, end, given, at, is_base))
        lengths = {s.end - s.start for s in sources}
        if len(lengths) != 1:
            raise ConfigError(f"{where}: every source of a slice must span the same number of layers, got "
                              f"{[[s.start, s.end] for s in sources]}")
        try:
            method.check_inputs(len(sources), any(s.is_base for s in sources))
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        slices.append(SliceEntry(sources, _params(f"{where}.parameters", e.get("parameters"), method), where))
    for p in method.params:
        if p.per_model and p.required:
            for sl in slices:
                for src in sl.sources:
                    if not src.is_base and not any(p.name in sc for sc in (src.settings, sl.settings, glob)):
                        raise ConfigError(f"{src.where}: parameter {p.name!r} is required for {method.name}")
    shared, shared_settings = {}, {}
    for p in method.params:
        if p.per_model:
            continue
        if p.name in glob:
            shared_settings[p.name] = glob[p.name]
            shared[p.name] = glob[p.name].value if glob[p.name].constant else glob[p.name].raw()
        elif p.required and not all(p.name in sl.settings for sl in slices):
            raise ConfigError(f"parameters: parameter {p.name!r} is required for {method.name}")
        else:
            shared[p.name] = p.default
    models = [ModelEntry(p.path, {}, is_base=base is not None and p.same(base), where="slices", lora=p.lora)
              for p in paths]
    return MergeConfig(method=method, base=base.path if base else None, base_lora=base.lora if base else None,
                       models=models, params=shared, dtype=dtype, out_dtype=out_dtype,
                       source=raw, shared_settings=shared_settings, varying=True, slices=slices,
                       model_settings={k: v for k, v in glob.items() if method.param(k).per_model})


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
