"""Which tensors of a fine-tune BitDelta compresses: every 2-D float matrix
except embeddings, the LM head, norms and poolers (they stay full
precision, as in the reference code), changed with glob patterns."""

import fnmatch
from typing import Iterable, Optional, Sequence

from .. import dtypes

#: Names matching any of these are stored verbatim by default.
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*norm*", "*pooler*")


class Selection:
    """``include``: globs a compressed tensor must match (all 2-D float
    tensors when empty); ``exclude``: globs that keep a tensor verbatim.
    A pattern ``!GLOB`` given in ``patterns`` excludes, any other includes."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE):
        for p in (*include, *exclude):
            if not isinstance(p, str) or not p:
                raise ValueError(f"select: expected glob patterns (non-empty strings), got {p!r}")
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    @classmethod
    def from_patterns(cls, patterns: Optional[Iterable[str]]) -> "Selection":
        """``None``: the default rule; otherwise ``GLOB`` includes, ``!GLOB``
        excludes (and replaces the default exclusions)."""
        if patterns is None:
            return cls()
        if isinstance(patterns, str):
            patterns = [patterns]
        patterns = list(patterns)
        inc = [p for p in patterns if not p.startswith("!")]
        exc = [p[1:] for p in patterns if p.startswith("!")]
        return cls(inc, exc if exc else (DEFAULT_EXCLUDE if not inc else ()))

    def to_json(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude),
                "rule": "2-D F32/F16/BF16 tensors matching an include glob (any when none) and no exclude glob"}

    def __call__(self, name: str, dtype: str, shape: Sequence[int]) -> bool:
        if dtype not in dtypes.KERNEL_FLOATS or len(shape) != 2 or 0 in shape:
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
