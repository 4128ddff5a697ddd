"""BitDelta on real fine-tunes: the tiny GPT of ``ferrox.testing`` (5 seeds:
pretrained on the ``pretrain`` part of the fixed split, fine-tuned on
``statements``) and a contrastive fine-tune of the embedded MiniLM.

The models come from the training cache (``tasks`` / ``minilm``): the first
run on a machine trains them (about 1.5 CPU-minutes per tiny-GPT seed, one
for MiniLM); later runs load them. Calibration batches come from the
fine-tune's training text, the measures from its held-out text (fixed in
advance by ``corpus.split(0)``).
"""

import itertools

import pytest
import torch

from ferrox import delta
from ferrox.models import default_model_path
from ferrox.testing import corpus, load_pretrained, minilm, tasks

PART = "statements"
#: The recipe the ≥ 90% claim is made for: per-row α (the opt-in; one α
#: per matrix keeps about 83%), AdamW at a relative lr of 0.2 with cosine
#: decay, 100 steps cycling over CALIB_BATCHES batches of 8 x 128 bytes of
#: the fine-tune's training text. Measured: 92.5%, 95.0%, 92.7%, 95.1%, 94.1% on seeds 0-4.
DISTILL = dict(steps=100, lr=0.2, per_row=True)
CALIB_BATCHES = 16


def calibration(seed):
    gen = tasks.batches(corpus.split(0).finetune[PART], 128, 8, seed=10_000 + seed)
    return [x for x, _ in itertools.islice(gen, CALIB_BATCHES)]


@pytest.mark.parametrize("seed", range(5))
def test_tiny_gpt_bitdelta_keeps_90_percent_of_the_fine_tune_gain_after_distillation(seed):
    """kept = (ppl_base − ppl_bitdelta) / (ppl_base − ppl_ft) on the held-out
    'statements' text: ≥ 0.90 after distillation, and distillation must
    raise it (before: 0.69-0.74 with α = mean|Δ| per matrix)."""
    base, ft = tasks.pretrained(seed), tasks.fine_tuned(PART, seed)
    held = corpus.split(0).heldout[PART]
    d = delta.compress(base, ft, progress=False)
    p_base = tasks.perplexity(load_pretrained(base), held)
    p_ft = tasks.perplexity(load_pretrained(ft), held)
    assert p_ft < p_base - 0.5, "the fine-tune must help on its own topic for the ratio to mean anything"
    plain = load_pretrained(base)
    delta.apply_bitdelta(plain, d)
    p_plain = tasks.perplexity(plain, held)
    with tasks._threads(tasks.TRAIN_THREADS):
        r = delta.distill(load_pretrained(base), delta.BitDelta.load(d.path), load_pretrained(ft), calibration(seed),
                          progress=False, **DISTILL)
    p_dist = tasks.perplexity(r.model, held)
    kept_plain = (p_base - p_plain) / (p_base - p_ft)
    kept = (p_base - p_dist) / (p_base - p_ft)
    msg = f"seed {seed}: ppl base {p_base:.3f}, ft {p_ft:.3f}, bitdelta {p_plain:.3f} -> distilled {p_dist:.3f}"
    assert kept > kept_plain, msg
    assert kept >= 0.90, f"{msg}: keeps {kept:.1%} of the gain"
    assert r.losses[-1] < r.initial_loss, msg


@pytest.fixture(scope="module")
def minilm_models():
    ft = minilm.fine_tuned(PART, 0)
    d = delta.compress(default_model_path(), ft, progress=False)
    base_m, tok = minilm.load()
    ft_m, _ = minilm.load(ft)
    return d, base_m, ft_m, tok


def test_minilm_bitdelta_embeddings_stay_close_to_the_fine_tune(minilm_models):
    """Held-out sentence embeddings: the BitDelta model closes ≥ 80% of the
    base's cosine gap to the fine-tune (measured about 94%), and the
    compressed matrices are ≥ 15.5x smaller than their fp16 delta."""
    d, base_m, ft_m, tok = minilm_models
    assert d.report()["summary"]["ratio_vs_fp16_delta"] >= 15.5
    bd, _ = minilm.load()
    delta.apply_bitdelta(bd, d)
    held = [a for a, _ in minilm.sentence_pairs(PART, heldout=True)]
    cos_base = minilm.embedding_cosine(base_m, ft_m, tok, held)
    cos_bd = minilm.embedding_cosine(bd, ft_m, tok, held)
    assert cos_base < 0.97, "the fine-tune must move the embeddings for the check to mean anything"
    assert 1 - cos_bd <= 0.2 * (1 - cos_base), (cos_base, cos_bd)


def test_minilm_distillation_of_the_last_hidden_state_lowers_held_out_error(minilm_models):
    d, base_m, ft_m, tok = minilm_models
    train = minilm.sentence_pairs(PART)
    calib = [minilm.tokenize(tok, [a for a, _ in train[i:i + 16]]) for i in range(0, 32, 16)]
    held = [minilm.tokenize(tok, [a for a, _ in minilm.sentence_pairs(PART, heldout=True)])]
    bd, _ = minilm.load()
    delta.apply_bitdelta(bd, delta.BitDelta.load(d.path))
    with tasks._threads(tasks.TRAIN_THREADS):
        r = delta.distill(minilm.load()[0], delta.BitDelta.load(d.path), ft_m, calib, steps=6, lr=0.3,
                          progress=False)
    before, after = delta.output_mse(bd, ft_m, held), delta.output_mse(r.model, ft_m, held)
    # measured with 12 steps over 4 batches: 1.8e-3 -> 3.1e-4
    assert after < 0.7 * before, (before, after)
    assert all(torch.isfinite(r.delta.alpha(n)).all() for n in r.delta.entries)
