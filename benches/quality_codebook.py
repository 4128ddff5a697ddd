"""Codebook quantization quality, measured (no timings): writes
``benches/results/codebook_quality.{md,json}``.

For each bit width b in 2, 3, 4, every selected matrix (MiniLM: the
encoder's nn.Linear weights; tiny GPT, seed 0: every nn.Linear but lm_head;
embeddings, norms and biases stay dense) is replaced by its decoded
quantization under four schemes:

- ``rtn``: per-row uniform round-to-nearest, 2^b levels from the row's min to
  its max (the baseline with the lowest weight MSE; 0 is not a level, so the
  many near-zero weights of a row all move by about the same offset);
- ``rtn_zp``: the same grid shifted so that 0 is a level (an integer zero
  point, as GPTQ/AWQ-style asymmetric RTN stores it): a little more weight
  error, but no per-row offset, which matters where a layer's inputs have a
  large mean (MiniLM's FFN output matrices read GELU activations);
- ``kmeans``: ``ferrox.codebook.quantize(w, b)``, one k-means codebook per tensor;
- ``jlcm_nocalib``: ``quantize(w, b, groups=G)``, rows grouped by their
  statistics, one codebook per group (JLCM-style grouping, no data);
- ``jlcm_calib``: the same, then ``ferrox.codebook.learn_codebook`` (proximal
  STE) on calibration inputs of each matrix, captured once from the original
  model with forward hooks (not sequentially from the partly quantized one).

Measures: MiniLM, mean cosine of held-out sentence embeddings to the
original model's (``ferrox.testing.minilm.embedding_cosine``); tiny GPT,
held-out ``statements`` perplexity (``ferrox.testing.tasks.perplexity``).
Calibration text is from the training splits, never the held-out text.

Usage: ``.venv/bin/python benches/quality_codebook.py [--bits 2,3,4] [--groups 8] [--steps 30]
[--models minilm,tiny_gpt] [--quick] [--results DIR]``; ``--quick`` is a
smoke run (3 bits, few sentences, 5 steps, the first two matrices learned).
"""

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMES = ("rtn", "rtn_zp", "kmeans", "jlcm_nocalib", "jlcm_calib")


def rtn(w, bits):
    """Per-row asymmetric uniform quantization with 2^b levels."""
    w = w.float()
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    step = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-12)
    return lo + torch.round((w - lo) / step).clamp(0, 2 ** bits - 1) * step


def rtn_zp(w, bits):
    """Per-row asymmetric uniform quantization with an integer zero point."""
    w = w.float()
    top = 2 ** bits - 1
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    step = ((hi - lo) / top).clamp(min=1e-12)
    zero = torch.round(-lo / step)
    return ((torch.round(w / step) + zero).clamp(0, top) - zero) * step


def jlcm(w, bits, groups, x, args, learn):
    """Grouped k-means (h5's quantize), then optionally joint learning on x."""
    from ferrox.codebook import dequantize, learn_codebook, quantize
    from ferrox.codebook.codec import codes as unpacked

    q = quantize(w, bits, groups=groups)
    if not learn:
        return dequantize(q, torch.float32)
    perm = torch.arange(w.shape[0]) if q.perm is None else q.perm.long()
    cb, c, sc, _ = learn_codebook(w.float()[perm], q.codebooks[..., 0], unpacked(q), x,
                                  group_offsets=q.group_offsets, scales=q.row_scale, steps=args.steps,
                                  assign="proximal", assign_lr=args.assign_lr, progress=False)
    rg = torch.repeat_interleave(torch.arange(cb.shape[0]), (q.group_offsets[1:] - q.group_offsets[:-1]).long())
    out = torch.empty(w.shape)
    out[perm] = sc[:, None] * cb[rg[:, None], c.long()]
    return out


def quantized_state(model, names, scheme, bits, args, calib):
    """The model's weights with each selected matrix replaced (original dtypes)."""
    from ferrox.codebook import dequantize, quantize

    mods = dict(model.named_modules())
    out = {}
    for i, name in enumerate(names):
        w = mods[name].weight.detach()
        if scheme == "rtn":
            w_hat = rtn(w, bits)
        elif scheme == "rtn_zp":
            w_hat = rtn_zp(w, bits)
        elif scheme == "kmeans":
            w_hat = dequantize(quantize(w, bits), torch.float32)
        else:
            learn = scheme == "jlcm_calib" and (args.learn_matrices is None or i < args.learn_matrices)
            w_hat = jlcm(w, bits, args.groups, calib.get(name), args, learn)
        out[name + ".weight"] = w_hat.to(w.dtype)
    return out


def with_weights(model, state):
    import copy

    m = copy.deepcopy(model)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    return m


def minilm_rows(args):
    from ferrox.codebook import capture_inputs
    from ferrox.testing import minilm

    model, tok = minilm.load()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    n_train, n_held = (16, 32) if args.quick else (64, 256)
    train = [a for a, _ in minilm.sentence_pairs("statements")][:n_train]
    held = [a for a, _ in minilm.sentence_pairs("statements", heldout=True)][:n_held]
    calib = capture_inputs(model, names, (minilm.tokenize(tok, train[i:i + 16]) for i in range(0, len(train), 16)))
    rows = []
    for bits in args.bits:
        for scheme in SCHEMES:
            t = time.perf_counter()
            m = with_weights(model, quantized_state(model, names, scheme, bits, args, calib))
            cos = minilm.embedding_cosine(model, m, tok, held)
            rows.append({"model": "minilm", "bits": bits, "scheme": scheme, "embedding_cosine": round(cos, 5),
                         "matrices": len(names), "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
    return rows


def tiny_gpt_rows(args):
    from ferrox.codebook import capture_inputs
    from ferrox.testing import corpus, load_pretrained, tasks

    model = load_pretrained(tasks.pretrained(0)).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    split = corpus.split(0)
    held = split.heldout["statements"]
    gen = tasks.batches(split.train_text("statements"), 128, 8, seed=1)
    n_batches = 1 if args.quick else 4
    calib = capture_inputs(model, names, (next(gen)[0] for _ in range(n_batches)))
    max_tokens = 4096 if args.quick else tasks.EVAL_TOKENS
    rows = [{"model": "tiny_gpt", "bits": 32, "scheme": "original",
             "perplexity": round(tasks.perplexity(model, held, max_tokens=max_tokens), 4)}]
    print(rows[-1], flush=True)
    for bits in args.bits:
        for scheme in SCHEMES:
            t = time.perf_counter()
            m = with_weights(model, quantized_state(model, names, scheme, bits, args, calib))
            rows.append({"model": "tiny_gpt", "bits": bits, "scheme": scheme,
                         "perplexity": round(tasks.perplexity(m, held, max_tokens=max_tokens), 4),
                         "matrices": len(names), "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
    return rows


def report(rows, args):
    lines = ["## codebook quality" + (" (quick)" if args.quick else ""), "",
             f"groups {args.groups} for the JLCM-style schemes; joint learning {args.steps} steps, proximal STE, "
             f"assign_lr {args.assign_lr}; calibration inputs from the training split, captured once from the "
             "original model", ""]
    for model, metric in (("minilm", "embedding_cosine"), ("tiny_gpt", "perplexity")):
        sel = [r for r in rows if r["model"] == model]
        if not sel:
            continue
        lines += [f"### {model}: {metric}", "", "| bits | " + " | ".join(SCHEMES) + " |",
                  "|---:|" + "---:|" * len(SCHEMES)]
        orig = [r for r in sel if r["scheme"] == "original"]
        if orig:
            lines.insert(len(lines) - 2, f"original: {orig[0][metric]}\n")
        for bits in args.bits:
            vals = {r["scheme"]: r[metric] for r in sel if r["bits"] == bits}
            lines.append(f"| {bits} | " + " | ".join(str(vals.get(s, "—")) for s in SCHEMES) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "codebook_quality.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "codebook_quality.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=lambda v: [int(b) for b in v.split(",")], default=[2, 3, 4])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--assign-lr", type=float, default=0.01)
    p.add_argument("--models", type=lambda v: v.split(","), default=["minilm", "tiny_gpt"])
    p.add_argument("--learn-matrices", type=int, default=None, help="learn only the first N matrices (smoke runs)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 bits, few sentences, 5 steps, 2 matrices learned")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    if args.quick:
        args.bits, args.steps = [3], 5
        args.learn_matrices = 2 if args.learn_matrices is None else args.learn_matrices
    rows = []
    if "minilm" in args.models:
        rows += minilm_rows(args)
    if "tiny_gpt" in args.models:
        rows += tiny_gpt_rows(args)
    report(rows, args)


if __name__ == "__main__":
    sys.exit(main())
