"""A real English text corpus that ships with every Python: the help topics
of ``pydoc_data.topics`` (about 465 KB of the Language Reference, the
standard types and pdb), split by topic into a pretraining part, two
fine-tuning parts and held-out text for each.

The split is fixed in code so results compare across runs and sessions:

* ``statements`` (fine-tuning): the statement topics of the Language
  Reference, chapters 7 (simple statements) and 8 (compound statements):
  ``STATEMENT_TOPICS``.
* ``datamodel`` (fine-tuning): the topics of the Language Reference's data
  model, chapter 3 (objects, the type hierarchy, special method names):
  ``DATAMODEL_TOPICS``.
* ``pretrain``: every other topic (lexical analysis, the execution model,
  expressions, the built-in types' methods, format strings, pdb), including
  any topic a later Python adds.

Several topics repeat paragraphs of others (``compound`` holds ``if``,
``for``, ``try``...; ``specialnames`` holds ``customization``...), so the
text is first deduplicated by paragraph (blocks separated by a blank line,
stripped): a paragraph of 32 characters or more is kept only at its first
occurrence, topics taken in sorted key order. Shorter paragraphs
(``"Note:"``, ``"See also:"``) are boilerplate and kept everywhere.

Held-out text: each topic's kept paragraphs are cut into ``HELDOUT_BINS``
contiguous bins by byte offset; bin ``(HELDOUT_BINS - 1 - seed) % HELDOUT_BINS``
of every topic of a part is that part's held-out text (``seed=0``, the one
every ferrox test and demo uses: the last eighth of each topic). A held-out
paragraph that occurs inside any training text (the same sentences wrapped
into a longer paragraph elsewhere) is dropped, so no training text contains
a held-out paragraph.

Sizes for Python 3.11's topics, ``split(0)`` (bytes of UTF-8; 464,970
characters before deduplication): pretrain 166,658 train / 18,200 held out
(47 topics); statements 73,188 / 9,312 (22 topics; ``if`` is wholly inside
``compound``); datamodel 94,502 / 11,966 (9 topics). Other Python versions ship slightly different topics (the
tiny-GPT cache key covers the corpus text, so a change retrains).
"""

import functools
import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Tuple

#: Language Reference chapters 7 and 8: simple and compound statements.
STATEMENT_TOPICS = (
    "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "else", "for",
    "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield",
)
#: Language Reference chapter 3: the data model.
DATAMODEL_TOPICS = (
    "attribute-access", "callable-types", "context-managers", "customization", "numeric-types", "objects",
    "sequence-types", "specialnames", "types",
)
FINETUNE_TOPICS = MappingProxyType({"statements": STATEMENT_TOPICS, "datamodel": DATAMODEL_TOPICS})
HELDOUT_BINS = 8
#: Paragraphs shorter than this are boilerplate and not deduplicated.
DEDUP_MIN_CHARS = 32


def topics() -> dict:
    """Topic key -> text of Python's own ``pydoc_data.topics.topics``."""
    from pydoc_data.topics import topics as raw

    return {k: raw[k] for k in sorted(raw)}


@dataclass(frozen=True)
class Split:
    """``pretrain``: pretraining text; ``finetune``: part name -> training
    text; ``heldout``: ``"pretrain"`` and each fine-tuning part -> held-out
    text; ``topics``: part name -> topic keys it was made of."""

    pretrain: str
    finetune: Mapping[str, str]
    heldout: Mapping[str, str]
    topics: Mapping[str, Tuple[str, ...]]
    seed: int

    @property
    def parts(self) -> Tuple[str, ...]:
        return ("pretrain",) + tuple(self.finetune)

    def train_text(self, part: str) -> str:
        if part == "pretrain":
            return self.pretrain
        if part not in self.finetune:
            raise KeyError(f"split: unknown part {part!r} (known: {list(self.parts)})")
        return self.finetune[part]

    def sizes(self) -> dict:
        """Part -> (training bytes, held-out bytes), UTF-8."""
        return {p: (len(self.train_text(p).encode()), len(self.heldout[p].encode())) for p in self.parts}

    def digest(self) -> str:
        """A hash of every text of the split (part of the model cache key)."""
        h = hashlib.sha256()
        for p in self.parts:
            for text in (self.train_text(p), self.heldout[p]):
                data = text.encode()
                h.update(len(data).to_bytes(8, "little") + data)
        return h.hexdigest()


def _paragraphs(text: str):
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@functools.lru_cache(maxsize=8)
def split(seed: int = 0) -> Split:
    """The fixed split described in the module docstring; ``seed`` only
    chooses which bin of each topic is held out (0 is the documented one)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"split: seed must be a non-negative int, got {seed!r}")
    held_bin = (HELDOUT_BINS - 1 - seed) % HELDOUT_BINS
    part_of = {t: part for part, keys in FINETUNE_TOPICS.items() for t in keys}
    names = ("pretrain",) + tuple(FINETUNE_TOPICS)
    train = {p: [] for p in names}
    held = {p: [] for p in names}
    members = {p: [] for p in names}
    seen = set()
    for key, text in topics().items():
        part = part_of.get(key, "pretrain")
        kept = []
        for para in _paragraphs(text):
            if len(para) >= DEDUP_MIN_CHARS:
                if para in seen:
                    continue
                seen.add(para)
            kept.append(para)
        if not kept:
            continue
        members[part].append(key)
        total = sum(len(p) + 2 for p in kept)
        offset = 0
        for para in kept:
            (held if offset * HELDOUT_BINS // total == held_bin else train)[part].append(para)
            offset += len(para) + 2
    join = "\n\n".join
    # A held-out paragraph may still occur inside a longer training paragraph
    # (the same sentence wrapped into another paragraph elsewhere): drop it.
    training = [join(train[p]) for p in names]
    for p in names:
        held[p] = [h for h in held[p] if len(h) < DEDUP_MIN_CHARS or not any(h in t for t in training)]
    return Split(
        pretrain=join(train["pretrain"]),
        finetune=MappingProxyType({p: join(train[p]) for p in FINETUNE_TOPICS}),
        heldout=MappingProxyType({p: join(held[p]) for p in names}),
        topics=MappingProxyType({p: tuple(members[p]) for p in names}),
        seed=seed,
    )
