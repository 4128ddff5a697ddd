"""Tokenizers of a merge, as mergekit 0.1.5 defines them: ``tokenizer_source``
(``base``, ``union`` or a model), the ``tokenizer:`` block (forced ``tokens``
and where their embedding rows come from, ``pad_to_multiple_of``) and
``chat_template``.

The output vocabulary is built with the ``tokenizers`` library (each
model's ``tokenizer.json``); every vocabulary-indexed tensor (``embed_tokens``,
``lm_head``) of every input is re-indexed to it before the merge method runs,
by mergekit's rule for a token some input lacks:

- present in exactly one input: that input's row;
- present in several: the base model's row when the base is an input and
  has it, else the mean of the rows of the inputs that have it;
- present in none: zeros;
- a token under ``tokenizer.tokens``: its ``source`` (a model's row of the
  same token, of another token ``token``/``token_id``, or ``kind: zero``)
  where an input lacks it, or always with ``force: true``;
- rows past the vocabulary (``pad_to_multiple_of``): per input, the mean of
  its re-indexed rows.

The base tokenizer's tokens whose ids are past its model's ``vocab_size``
are stripped first (BPE only, as mergekit); another model's such tokens
count as absent from it.

One deliberate difference: mergekit's union appends the tokens the base
lacks in hash-map order (it varies between runs); ferrox appends them in
model order, each model's by id, so the same config always gives the same
ids. Token strings map to the same rows either way.
"""

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

#: Tokenizer files a rebuilt tokenizer replaces (the donor's copies would disagree with it).
STALE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
                         "added_tokens.json", "chat_template.jinja", "chat_template.json")
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
#: names of vocabulary-indexed tensors (vocabulary on axis 0), by their last two name components
VOCAB_TENSORS = {("embed_tokens", "weight"), ("lm_head", "weight"), ("wte", "weight"), ("embed_in", "weight"),
                 ("embed_out", "weight"), ("word_embeddings", "weight")}


@dataclass(frozen=True)
class Ref:
    """A merge input as mergekit names it: a model folder, optionally with a
    PEFT LoRA adapter applied (``model+lora``)."""
    path: str
    lora: Optional[str] = None

    def same(self, other: "Ref") -> bool:
        if not os.path.samefile(self.path, other.path):
            return False
        if self.lora is None or other.lora is None:
            return self.lora is None and other.lora is None
        return os.path.samefile(self.lora, other.lora)

    def __str__(self) -> str:
        return self.path if self.lora is None else f"{self.path}+{self.lora}"


@dataclass(frozen=True)
class TokenSource:
    """Where a forced token's row comes from: ``kind`` "zero", "model" (that
    model's row of the same token) or "model_token" (its row of ``token`` or
    ``token_id``); None: no source (the token must be in every input)."""
    kind: Optional[str]
    model: Optional[Ref] = None
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class TokenSpec:
    source: TokenSource
    force: bool = False


@dataclass
class TokenizerSpec:
    """The checked tokenizer settings of a merge config."""
    #: "base", "union" or a model
    source: object
    tokens: Dict[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None

    def raw(self) -> dict:
        src = self.source if isinstance(self.source, str) else str(self.source)
        out = {"source": src}
        if self.tokens:
            out["tokens"] = {k: {"source": _source_raw(v.source), "force": v.force} for k, v in self.tokens.items()}
        if self.pad_to_multiple_of:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out


def _source_raw(s: TokenSource):
    if s.kind is None:
        return None
    if s.kind == "zero":
        return {"kind": "zero"}
    if s.kind == "model":
        return str(s.model)
    key = ("token", s.token) if s.token is not None else ("token_id", s.token_id)
    return {"kind": "model_token", "model": str(s.model), key[0]: key[1]}


def _kind(v) -> str:
    return type(v).__name__


def _parse_source(where: str, value, ref: Callable[[str, object], Ref]) -> object:
    if value in ("base", "union"):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected 'base', 'union' or a model path, got {value!r}")
    return ref(where, value)


def _parse_token(where: str, raw, ref) -> TokenSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with 'source' and/or 'force', got {_kind(raw)}")
    for key in raw:
        if key not in TOKEN_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (known: {sorted(TOKEN_KEYS)})")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise ValueError(f"{where}.force: expected true or false, got {force!r}")
    src = raw.get("source")
    at = f"{where}.source"
    if src is None:
        source = TokenSource(None)
    elif isinstance(src, str):
        source = TokenSource("model", ref(at, src))
    elif isinstance(src, dict):
        kind = src.get("kind")
        if kind == "zero":
            if set(src) != {"kind"}:
                raise ValueError(f"{at}: kind zero takes no other keys, got {sorted(set(src) - {'kind'})}")
            source = TokenSource("zero")
        elif kind == "model_token":
            extra = set(src) - {"kind", "model", "token", "token_id"}
            if extra:
                raise ValueError(f"{at}: unknown key {sorted(extra)[0]!r} (known: kind, model, token, token_id)")
            if "model" not in src:
                raise ValueError(f"{at}: kind model_token needs a model")
            if ("token" in src) == ("token_id" in src):
                raise ValueError(f"{at}: give exactly one of token and token_id (as mergekit)")
            tok, tid = src.get("token"), src.get("token_id")
            if tok is not None and not isinstance(tok, str):
                raise ValueError(f"{at}.token: expected a token string, got {tok!r}")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise ValueError(f"{at}.token_id: expected a token id >= 0, got {tid!r}")
            source = TokenSource("model_token", ref(f"{at}.model", src["model"]), tok, tid)
        else:
            raise ValueError(f"{at}: kind must be 'zero' or 'model_token' (or give a model path), got {kind!r}")
    else:
        raise ValueError(f"{at}: expected a model path or a mapping with 'kind', got {_kind(src)}")
    return TokenSpec(source, force)


def parse_tokenizer(raw: dict, ref: Callable[[str, object], Ref]) -> Optional[TokenizerSpec]:
    """The tokenizer settings of a merge config (``tokenizer_source`` and the
    ``tokenizer:`` block), None when neither is given. ``ref(where, value)``
    resolves a model reference. Raises ``ValueError`` naming the key."""
    block = raw.get("tokenizer")
    if "tokenizer_source" in raw and block is not None:
        raise ValueError("config: give one of tokenizer_source and tokenizer (mergekit ignores tokenizer_source "
                         "when both are set); put the source under tokenizer.source")
    if block is None:
        if raw.get("tokenizer_source") is None:
            return None
        return TokenizerSpec(_parse_source("tokenizer_source", raw["tokenizer_source"], ref))
    if not isinstance(block, dict):
        raise ValueError(f"tokenizer: expected a mapping (source, tokens, pad_to_multiple_of), got {_kind(block)}")
    for key in block:
        if key not in TOKENIZER_KEYS:
            raise ValueError(f"tokenizer: unknown key {key!r} (known: {sorted(TOKENIZER_KEYS)})")
    source = _parse_source("tokenizer.source", block.get("source", "union"), ref)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ValueError(f"tokenizer.pad_to_multiple_of: expected an integer >= 1, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ValueError(f"tokenizer.tokens: expected a mapping of token strings, got {_kind(tokens)}")
    specs = {}
    for tok, spec in tokens.items():
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"tokenizer.tokens: token keys must be non-empty strings, got {tok!r}")
        specs[tok] = _parse_token(f"tokenizer.tokens[{tok!r}]", spec, ref)
    return TokenizerSpec(source, specs, pad)


# --- chat templates ----------------------------------------------------------

def builtin_chat_template(name: str) -> Optional[str]:
    """The text of one of mergekit's named chat templates (read from the
    installed mergekit package; ferrox does not ship copies), None when that
    name is not one or mergekit is not installed."""
    try:
        import importlib.resources

        from mergekit._data import chat_templates
    except ImportError:
        return None
    t = importlib.resources.files(chat_templates).joinpath(name + ".jinja")
    return t.read_text() if t.is_file() else None


def check_chat_template(value) -> str:
    """A config's ``chat_template``, checked as mergekit checks it: ``auto``, a
    named template, or a literal Jinja template (20+ characters with a '{')."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"chat_template: expected a template name or Jinja text, got {value!r}")
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if builtin_chat_template(value) is not None:
            return value
        raise ValueError(f"chat_template: {value!r} is not a template name mergekit knows (alpaca, chatml, "
                         f"exaone, llama3, mistral; named templates are read from the installed mergekit) "
                         f"nor Jinja text")
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"chat_template: {value[:40]!r} is not a valid template (mergekit wants Jinja text of "
                         f"at least 20 characters with a '{{')")
    return value


def _model_chat_template(folder: str) -> Optional[str]:
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) and t else None


def resolve_chat_template(value: Optional[str], folders: Sequence[str]) -> Optional[str]:
    """The template text to write: ``auto`` picks the one most of the models'
    tokenizers carry (stripped; None when none does), as mergekit does."""
    if not value:
        return None
    if value == "auto":
        found = [t.strip() for t in (_model_chat_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    named = builtin_chat_template(value) if ("{" not in value and "\n" not in value) else None
    return named if named is not None else value


# --- vocabularies ------------------------------------------------------------

def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def config_vocab_size(folder: str) -> Optional[int]:
    cfg = _read_json(os.path.join(folder, "config.json"))
    n = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    if n is None and isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        n = cfg["text_config"].get("vocab_size")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def load_tokenizer(folder: str, required: bool, what: str):
    """A model folder's fast tokenizer (``tokenizer.json``), None when the
    folder has no tokenizer files at all and ``required`` is false (mergekit
    then assumes the base model's)."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise ValueError(f"{what}: {path} is not a tokenizer the tokenizers library reads ({e})") from None
    slow = [n for n in ("tokenizer.model", "vocab.txt", "vocab.json") if os.path.isfile(os.path.join(folder, n))]
    if slow:
        raise ValueError(f"{what}: {folder} has {slow[0]} but no tokenizer.json; ferrox reads fast tokenizers "
                         f"(save the tokenizer with transformers' save_pretrained to get one)")
    if required:
        raise ValueError(f"{what}: {folder} has no tokenizer.json; a tokenizer merge needs the base model's "
                         f"tokenizer")
    return None


@dataclass
class VocabPlan:
    """The output tokenizer and, per merge input, where each output token's row is."""
    tokenizer: object  # tokenizers.Tokenizer
    #: token -> output id (added tokens included)
    vocab: Dict[str, int]
    #: output rows: len(vocab) padded to pad_to_multiple_of
    rows: int
    #: per input: for each output id, the input's row of that token or -1
    perms: List[List[int]]
    #: per input: its tokenizer's vocabulary (the base's when it has none)
    vocabs: List[Dict[str, int]]
    #: per input: its embedding row count (config.json's vocab_size)
    sizes: List[int]
    spec: TokenizerSpec
    #: the folder whose tokenizer_config.json/special_tokens_map.json the output takes
    config_folder: str


def build_vocab(spec: TokenizerSpec, refs: Sequence[Ref], base: int) -> VocabPlan:
    """The output vocabulary of ``spec`` over the merge inputs ``refs``
    (``base``: index of the base model, else of the first model) and each
    input's permutation into it, as mergekit's ``build_tokenizer``."""
    from tokenizers import Tokenizer

    toks, vocabs, sizes = [], [], []
    base_tok = load_tokenizer(refs[base].path, True, f"base model {refs[base].path}")
    for i, r in enumerate(refs):
        tok = base_tok if i == base else load_tokenizer(r.path, False, f"model {r.path}")
        vocab = (tok or base_tok).get_vocab(with_added_tokens=True)
        size = config_vocab_size(r.path) or len(vocab)
        toks.append(tok)
        vocabs.append(vocab)
        sizes.append(size)
    if any(i >= sizes[base] for i in vocabs[base].values()):
        base_tok = _stripped(base_tok, sizes[base], refs[base].path)
        toks[base] = base_tok
        vocabs = [base_tok.get_vocab(with_added_tokens=True) if t is None or i == base else v
                  for i, (t, v) in enumerate(zip(toks, vocabs))]
    config_folder = refs[base].path
    if isinstance(spec.source, Ref):
        config_folder = spec.source.path
        out = load_tokenizer(spec.source.path, True, f"tokenizer source {spec.source.path}")
    else:
        out = Tokenizer.from_str(base_tok.to_str())
        if spec.source == "union":
            _union(out, base_tok, toks, vocabs, sizes, base)
    existing = set(out.get_vocab(with_added_tokens=True))
    out.add_tokens([tok for tok in spec.tokens if tok not in existing])
    vocab = out.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise ValueError(f"output tokenizer: ids are not 0..{n - 1} (a tokenizer with holes in its ids)")
    rows = n
    pad = spec.pad_to_multiple_of
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    perms = []
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    for v, size in zip(vocabs, sizes):
        # a token whose id is past the model's embedding rows (tokenizer padding) has no row there
        perms.append([i if (i := v.get(tok, -1)) < size else -1 for tok, _ in by_id])
    return VocabPlan(out, vocab, rows, perms, vocabs, sizes, spec, config_folder)


def _stripped(tok, size: int, path: str):
    """mergekit's ``get_stripped_tokenizer``: the base tokenizer without the
    tokens whose ids are past the model's embedding rows (and the BPE merges
    of such tokens); only BPE tokenizers can be stripped."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    kind = data.get("model", {}).get("type")
    if kind != "BPE":
        raise ValueError(f"base model {path}: its tokenizer has tokens with ids past vocab_size {size}; mergekit "
                         f"strips them from BPE tokenizers only, and this one is {kind}")
    unused = {t for t, i in tok.get_vocab(with_added_tokens=True).items() if i >= size}
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}

    def keep(m):
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    try:
        return Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the tokenizers library raises its own Exception type
        raise ValueError(f"base model {path}: its tokenizer stripped to vocab_size {size} is not valid ({e})") from None


def _union(out, base_tok, toks, vocabs, sizes, base) -> None:
    """mergekit's union: every model's tokens below its vocab_size, the base's
    ids kept; the other tokens appended, then every model's added tokens
    (first settings win)."""
    order = [base] + [i for i in range(len(toks)) if i != base]
    words, seen, added = [], set(), {}
    for i in order:
        if toks[i] is None and i != base:
            continue  # mergekit: a model without a tokenizer is taken to have the base's
        tok = toks[i]
        for t, idx in sorted(vocabs[i].items(), key=lambda kv: kv[1]):
            if idx < sizes[i] and t not in seen:
                seen.add(t)
                words.append(t)
        for idx, info in sorted(tok.get_added_tokens_decoder().items()):
            if idx < sizes[i] and info.content not in added:
                added[info.content] = info
    base_vocab = vocabs[base]
    # One call per group, not per token (each call rebuilds the added-token
    # matcher: per token is quadratic); ids come out in list order either way.
    out.add_tokens([t for t in words if t not in added and t not in base_vocab])
    out.add_tokens(list(added.values()))  # keeps each token's special/normalized settings, as transformers


def is_vocab_tensor(name: str) -> bool:
    return tuple(name.split(".")[-2:]) in VOCAB_TENSORS


def align_rows(plan: VocabPlan, name: str, tensors: List["torch.Tensor"], inputs: List[int],  # noqa: F821
               base: Optional[int], refs: Sequence[Ref]) -> List["torch.Tensor"]:  # noqa: F821
    """mergekit's ``PermutedVocabulary``: each tensor (of merge input
    ``inputs[k]``, vocabulary on axis 0) re-indexed to the output
    vocabulary, in the tensors' common dtype. ``base``: the base model's
    position in ``inputs`` when it is one of them."""
    import torch

    for k, (t, i) in enumerate(zip(tensors, inputs)):
        if t.dim() < 1 or t.shape[0] < plan.sizes[i]:
            raise ValueError(f"tensor {name!r} of {refs[i]}: {list(t.shape)} has fewer rows than the model's "
                             f"vocab_size {plan.sizes[i]}")
    shape = tensors[0].shape[1:]
    for t, i in zip(tensors, inputs):
        if t.shape[1:] != shape:
            raise ValueError(f"tensor {name!r} of {refs[i]}: {list(t.shape)}; the non-vocabulary dimensions must "
                             f"match {list(tensors[0].shape)} of {refs[inputs[0]]}")
    dtype = tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    perms = [plan.perms[i] for i in inputs]
    configs = dict(plan.spec.tokens)
    average, sources = set(), {}
    for tok, tid in plan.vocab.items():
        if tok in configs:
            continue
        has = [p[tid] >= 0 for p in perms]
        present = sum(has)
        if present == 1:
            sources[tok] = ("input", has.index(True))
        elif present == 0:
            sources[tok] = ("zero",)
        elif base is not None and has[base]:
            sources[tok] = ("input", base)
        else:
            average.add(tok)
    default = {}
    for tok, tid in plan.vocab.items():
        cfg = configs.get(tok)
        if not (cfg is not None and cfg.force) and all(p[tid] >= 0 for p in perms):
            continue
        if tok in average:
            row = torch.zeros(shape, dtype=dtype)
            count = 0
            for t, p in zip(tensors, perms):
                if p[tid] >= 0:
                    row = row + t[p[tid]]
                    count += 1
            row /= count
        elif tok in sources:
            src = sources[tok]
            row = torch.zeros(shape, dtype=dtype) if src[0] == "zero" else tensors[src[1]][perms[src[1]][tid]]
        else:
            row = _configured_row(plan, name, tok, tid, cfg, tensors, perms, inputs, refs, shape, dtype)
        default[tok] = row
    out = []
    n = len(plan.vocab)
    forced = torch.zeros(n, dtype=torch.bool)
    for tok, cfg in configs.items():
        if cfg.force and tok in plan.vocab:
            forced[plan.vocab[tok]] = True
    if default:
        default_ids = torch.tensor([plan.vocab[tok] for tok in default], dtype=torch.long)
        default_rows = torch.stack([row.to(dtype) for row in default.values()])
    for t, p in zip(tensors, perms):
        new = torch.zeros((plan.rows, *shape), dtype=dtype)
        t = t.to(dtype)
        idx = torch.tensor(p, dtype=torch.long)
        own = (idx >= 0) & ~forced
        new[:n][own] = t[idx[own]]  # the input's own rows, gathered at once
        if default:
            need = ~own[default_ids]
            new[default_ids[need]] = default_rows[need]
        if plan.rows > n:
            new[n:] = torch.mean(new[:n], dim=0)  # vocabulary padding: the mean row, as mergekit
        out.append(new)
    return out


def _configured_row(plan, name, tok, tid, cfg, tensors, perms, inputs, refs, shape, dtype):
    import torch

    src = cfg.source
    if src.kind == "zero":
        return torch.zeros(shape, dtype=tensors[0].dtype)
    if src.kind is None:
        missing = [str(refs[i]) for i, p in zip(inputs, perms) if p[tid] < 0]
        raise ValueError(f"tokenizer.tokens[{tok!r}]: has no source, but {', '.join(missing) or 'force'} needs a "
                         f"row for it (tensor {name!r}); give a source (a model, or kind: zero)")
    k = next((k for k, i in enumerate(inputs) if refs[i].same(src.model)), None)
    if k is None:
        raise ValueError(f"tokenizer.tokens[{tok!r}]: its source {src.model} is not an input of tensor {name!r}")
    if src.kind == "model":
        if perms[k][tid] < 0:
            raise ValueError(f"tokenizer.tokens[{tok!r}]: its source {src.model} does not have the token")
        return tensors[k][perms[k][tid]]
    i = inputs[k]
    row = src.token_id
    if row is None:
        if src.token not in plan.vocabs[i]:
            raise ValueError(f"tokenizer.tokens[{tok!r}]: token {src.token!r} is not in {src.model}'s tokenizer")
        row = plan.vocabs[i][src.token]
    if not 0 <= row < tensors[k].shape[0]:
        raise ValueError(f"tokenizer.tokens[{tok!r}]: token id {row} is out of range for {src.model} "
                         f"({tensors[k].shape[0]} rows in {name!r})")
    return tensors[k][row]


def write_tokenizer(folder: str, plan: Optional[VocabPlan], donor: str, chat_template: Optional[str]) -> None:
    """Writes the output tokenizer into ``folder`` (the output's temporary
    folder, the donor's side files already copied): ``tokenizer.json`` by the
    tokenizers library; ``tokenizer_config.json`` and
    ``special_tokens_map.json`` from the tokenizer's source model, with
    ``chat_template`` set (also written as ``chat_template.jinja``, where
    transformers 5 saves it). ``plan`` None: the donor's tokenizer kept, only
    the chat template set."""
    import shutil

    src = plan.config_folder if plan is not None else donor
    if plan is not None:
        for name in STALE_TOKENIZER_FILES:
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                os.remove(p)
        plan.tokenizer.save(os.path.join(folder, "tokenizer.json"))
        if src != donor and os.path.isfile(os.path.join(src, "special_tokens_map.json")):
            shutil.copyfile(os.path.join(src, "special_tokens_map.json"), os.path.join(folder, "special_tokens_map.json"))
    cfg = _read_json(os.path.join(src, "tokenizer_config.json"))
    if not isinstance(cfg, dict):
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if plan is not None:
        cfg.pop("added_tokens_decoder", None)  # ids of the source's tokenizer; tokenizer.json has the new ones
    if chat_template is not None:
        cfg["chat_template"] = chat_template
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(chat_template)
    if plan is not None or chat_template is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


__all__ = ["Ref", "TokenSource", "TokenSpec", "TokenizerSpec", "VocabPlan", "parse_tokenizer", "build_vocab",
           "align_rows", "is_vocab_tensor", "write_tokenizer", "check_chat_template", "resolve_chat_template"]
