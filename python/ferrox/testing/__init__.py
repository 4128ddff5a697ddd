"""Shared test fixtures with real quality to measure, offline: a tiny
byte-level GPT in the Llama layout (``tiny_gpt``), a text corpus that ships
with Python (``corpus``: ``pydoc_data.topics`` split by topic) and training,
perplexity and a cache of trained checkpoints (``tasks``); and a real
contrastive fine-tune of the embedded MiniLM on the same text (``minilm``).

>>> from ferrox.testing import tasks, corpus, load_pretrained
>>> base = load_pretrained(tasks.pretrained())
>>> tasks.perplexity(base, corpus.split().heldout["statements"])
"""

from . import corpus, minilm, tasks, tiny_gpt
from .tiny_gpt import TinyGPT, TinyGPTConfig, load_pretrained, save_pretrained

__all__ = ["TinyGPT", "TinyGPTConfig", "corpus", "load_pretrained", "minilm", "save_pretrained", "tasks", "tiny_gpt"]
