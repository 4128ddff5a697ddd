"""``make demo``: a real merge, measured.

1. The embedded default model (all-MiniLM-L6-v2): a one-line summary.
2. The shared tiny-GPT task (``ferrox.testing``): a 1.1M-parameter byte-level
   GPT in the Llama layout pretrained on Python's own documentation
   (``pydoc_data.topics``), and two fine-tunes of it on different topics
   (statements; the data model). The first run trains and caches them
   (``~/.cache/ferrox`` or ``$FERROX_CACHE``); later runs load them.
3. The two fine-tunes merged through the same path as ``ferrox merge``
   (``parse_config`` + ``merge_checkpoints``) with task arithmetic, TIES and
   Model Breadcrumbs + TIES, and a table of held-out perplexity on each
   topic for the base, each fine-tune and each merge.
4. BitDelta: the "statements" fine-tune compressed to 1-bit deltas of the
   base (``ferrox compress bitdelta``'s code path), its size against an fp16
   delta, and its held-out perplexity run through ``BitDeltaLinear``.
5. BitDelta of the embedded model: a contrastive fine-tune of MiniLM on the
   same topic's sentences (``ferrox.testing.minilm``; trained and cached on
   the first run), compressed, with its size and the cosine of its held-out
   sentence embeddings to the fine-tune's.
6. Codebooks of the embedded model: MiniLM's encoder matrices at 3 bits
   (``ferrox compress codebook``'s code path), per-tensor k-means and 8 row
   groups with activation-weighted k-means (Gram diagonals from 32
   training sentences): size on disk, bits per weight with every overhead,
   and the cosine of held-out sentence embeddings to the original model's.
7. Data importance (``ferrox.importance``): a 10k-item retrieval corpus with
   30% planted label noise; multilinear-extension importance learned on
   validation queries, the lowest 30% pruned, k-NN accuracy before and after
   (against pruning at random), and which items were flagged.
"""

import os
import tempfile
import time

from . import checkpoint
from .merge import merge_checkpoints, parse_config
from .models import default_model_path

#: The merges of the table: (label, merge_method, per-model parameters).
#: task_arithmetic and breadcrumbs_ties add the weighted task vectors
#: (mergekit's normalize: false), so two of them at weight 1 overshoot
#: (held-out perplexity 15 on pretrain); ties normalises by the agreeing
#: weights. Chosen on the seed-0 table among weights 0.5-1 and densities 0.3-1.
MERGES = (
    ("task_arithmetic", "task_arithmetic", {"weight": 0.6}),
    ("ties", "ties", {"weight": 1.0, "density": 0.5}),
    ("breadcrumbs_ties", "breadcrumbs_ties", {"weight": 0.6, "density": 0.7, "gamma": 0.01}),
)


def _minilm() -> None:
    base = default_model_path()
    info = checkpoint.read_checkpoint(base)
    print(f"default model: {base}\n  {len(info.tensors)} tensors, {info.total_params:,} parameters, "
          f"{checkpoint.human_bytes(info.total_bytes)}")


def _models():
    from .testing import corpus, tasks

    parts = tuple(corpus.FINETUNE_TOPICS)
    missing = [p for p in ("pretrain",) + parts if not tasks.is_cached(p)]
    if missing:
        print(f"training the tiny GPT (first run; cached in {tasks.cache_dir()}): {', '.join(missing)} ...", flush=True)
    start = time.perf_counter()
    base = tasks.pretrained(0)
    fts = {p: tasks.fine_tuned(p, 0) for p in parts}
    verb = "trained" if missing else "loaded from the cache"
    print(f"tiny GPT base + {len(fts)} fine-tunes {verb} in {time.perf_counter() - start:.1f} s")
    return base, fts


def main() -> int:
    _minilm()
    from .testing import TinyGPTConfig, corpus, load_pretrained, tasks

    cfg = TinyGPTConfig()
    split = corpus.split(0)
    sizes = split.sizes()
    print(f"\ntiny GPT task: byte-level Llama-layout GPT, {cfg.n_params():,} parameters "
          f"({cfg.n_layers} layers, dim {cfg.dim}, SwiGLU {cfg.ffn}), text: pydoc_data.topics")
    for part in split.parts:
        n_train, n_held = sizes[part]
        print(f"  {part:<11} {len(split.topics[part]):2d} topics, {n_train:>7,} bytes train, {n_held:>6,} bytes held out")
    base, fts = _models()
    rows = [("base", base)] + [(f"ft {p}", f) for p, f in fts.items()]
    with tempfile.TemporaryDirectory(prefix="ferrox-demo-") as tmp:
        for label, method, params in MERGES:
            conf = parse_config({
                "merge_method": method, "base_model": base,
                "models": [{"model": f, "parameters": dict(params)} for f in fts.values()],
            })
            out = os.path.join(tmp, label)
            report = merge_checkpoints(conf, out, progress=False)
            desc = ", ".join(f"{k} {v}" for k, v in params.items())
            print(f"merged the fine-tunes with {label} ({desc}) in {report.seconds:.2f} s")
            rows.append((label, out))
        start = time.perf_counter()
        table = [(label, [tasks.perplexity(load_pretrained(folder), split.heldout[p]) for p in split.parts])
                 for label, folder in rows]
        elapsed = time.perf_counter() - start
    print(f"\nheld-out perplexity (bytes; uniform = 256; first {tasks.EVAL_TOKENS:,} bytes of each part, "
          f"{elapsed:.1f} s):")
    print(f"  {'model':<18}" + "".join(f"{p:>12}" for p in split.parts))
    for label, values in table:
        print(f"  {label:<18}" + "".join(f"{v:12.2f}" for v in values))
    _bitdelta(base, fts["statements"], split)
    _minilm_bitdelta()
    _minilm_codebook()
    _importance()
    return 0


def _importance() -> None:
    """Planted label noise found by multilinear-extension importance."""
    import numpy as np

    from .importance import learn_importance, prune_lowest
    from .testing.retrieval import planted_noise

    c = planted_noise(seed=10)
    n = c.x.shape[0]
    start = time.perf_counter()
    v = learn_importance((c.retrieved, c.utility), c.k, 200.0, 5, num_items=n)
    took = time.perf_counter() - start
    cut = int(0.3 * n)
    keep = np.ones(n, dtype=bool)
    keep[prune_lowest(v, cut)] = False
    rand = np.ones(n, dtype=bool)
    rand[np.random.default_rng(0).choice(n, cut, replace=False)] = False
    print(f"\ndata importance: {n:,} retrieval items (4 classes, {c.noisy.mean():.0%} labels flipped), "
          f"{len(c.val_y):,} validation queries x {c.retrieved.shape[1]} retrieved; importance learned in {took:.2f} s")
    for label, mask in (("all items", np.ones(n, dtype=bool)), (f"lowest {cut:,} pruned", keep), (f"random {cut:,} pruned", rand)):
        val, test = c.accuracy(mask)
        print(f"  {label:<20} {c.k}-NN accuracy: validation {val:.3f}, test {test:.3f}")
    flagged = prune_lowest(v, 5)
    print(f"  {c.noisy[~keep].mean():.0%} of the pruned items carry a flipped label; the five lowest: "
          + ", ".join(f"#{i} ({'flipped' if c.noisy[i] else 'clean'})" for i in flagged))


def _minilm_codebook() -> None:
    """The embedded model at 3 bits per weight: size and fidelity."""
    import torch

    from .codebook.compress import compress, input_grams, restore
    from .testing import minilm

    src = default_model_path()
    model, tok = minilm.load()
    train = [a for a, _ in minilm.sentence_pairs("statements")][:32]
    held = [a for a, _ in minilm.sentence_pairs("statements", heldout=True)][:128]
    original = checkpoint.read_checkpoint(src).total_bytes
    start = time.perf_counter()
    grams = input_grams(model, [minilm.tokenize(tok, train[i:i + 16]) for i in range(0, len(train), 16)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ferrox-demo-codebook-") as tmp:
        for label, kw in (("per-tensor k-means", {}),
                          ("8 groups, weighted", {"groups": 8, "grams": grams, "calib_steps": 0})):
            t = time.perf_counter()
            folder = compress(src, 3, os.path.join(tmp, label.split()[0]), progress=False, **kw)
            took = time.perf_counter() - t
            s = folder.compress_report.summary
            q, _ = minilm.load()
            own = q.state_dict()
            dense = {k: v for k, v in restore(folder).items() if k in own}  # not the checkpoint's extra buffers
            changed = [k for k, v in dense.items() if not torch.equal(v, own[k])]
            q.load_state_dict(dense, strict=False)
            with torch.no_grad():
                cos = minilm.embedding_cosine(model, q, tok, held)
            rows.append((label, s, took, cos, len(changed)))
    s0 = rows[0][1]
    qw = s0["quantized_weights"]
    print(f"\ncodebooks of the embedded model at 3 bits: {s0['quantized_matrices']} matrices ({qw:,} weights, "
          f"{checkpoint.human_bytes(4 * qw)} in f32) quantized, {s0['verbatim_tensors']} tensors verbatim (embeddings, "
          f"norms, biases); original folder {checkpoint.human_bytes(original)}; {time.perf_counter() - start:.1f} s in "
          f"all. Cosine of {len(held)} held-out sentence embeddings to the original model's:")
    for label, s, took, cos, changed in rows:
        if changed != s["quantized_matrices"]:
            raise RuntimeError(f"codebook demo: {changed} weights changed, {s['quantized_matrices']} quantized")
        print(f"  {label:<20} matrices {checkpoint.human_bytes(s['quantized_bytes']):>9} "
              f"({s['bits_per_quantized_weight']:.3f} bits/weight with codebooks, permutations), folder "
              f"{checkpoint.human_bytes(s['folder_tensor_bytes'])} ({s['ratio_vs_original']:.2f}x smaller), "
              f"cosine {cos:.4f} ({took:.1f} s)")


def _minilm_bitdelta() -> None:
    """A real fine-tune of the embedded model as a BitDelta: size and fidelity."""
    from . import delta
    from .testing import minilm

    cached = minilm.is_cached("statements")
    if not cached:
        print("\nfine-tuning MiniLM on 'statements' sentence pairs (first run; cached) ...", flush=True)
    start = time.perf_counter()
    ft = minilm.fine_tuned("statements")
    took = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="ferrox-demo-bitdelta-") as tmp:
        d = delta.compress(default_model_path(), ft, out=os.path.join(tmp, "minilm.bitdelta"), progress=False)
        s = d.report()["summary"]
        base_m, tok = minilm.load()
        ft_m, _ = minilm.load(ft)
        bd_m, _ = minilm.load()
        delta.apply_bitdelta(bd_m, d)
        held = [a for a, _ in minilm.sentence_pairs("statements", heldout=True)]
        cos_base = minilm.embedding_cosine(base_m, ft_m, tok, held)
        cos_bd = minilm.embedding_cosine(bd_m, ft_m, tok, held)
    print(f"\nBitDelta of a MiniLM fine-tune ({'trained' if not cached else 'loaded'} in {took:.1f} s; contrastive, "
          f"'statements' sentences): {s['compressed_matrices']} matrices, "
          f"{checkpoint.human_bytes(s['delta_bytes'])} vs {checkpoint.human_bytes(s['fp16_delta_bytes'])} "
          f"for an fp16 delta ({s['ratio_vs_fp16_delta']:.1f}x)")
    print(f"  cosine of {len(held)} held-out sentence embeddings to the fine-tune's: base {cos_base:.4f}, "
          f"BitDelta {cos_bd:.4f} (before scale distillation)")


def _bitdelta(base: str, ft: str, split) -> None:
    """The statements fine-tune as a BitDelta: size and fidelity."""
    import torch

    from . import delta
    from .testing import load_pretrained, tasks

    with tempfile.TemporaryDirectory(prefix="ferrox-demo-bitdelta-") as tmp:
        start = time.perf_counter()
        d = delta.compress(base, ft, out=os.path.join(tmp, "statements.bitdelta"), progress=False)
        took = time.perf_counter() - start
        s = d.report()["summary"]
        print(f"\nBitDelta of 'ft statements': {s['compressed_matrices']} matrices as signs + one scale each "
              f"in {took:.2f} s: {checkpoint.human_bytes(s['delta_bytes'])} vs "
              f"{checkpoint.human_bytes(s['fp16_delta_bytes'])} for an fp16 delta ({s['ratio_vs_fp16_delta']:.1f}x); "
              f"whole folder {checkpoint.human_bytes(s['folder_tensor_bytes'])} "
              f"(embeddings, norms and lm_head stay verbatim)")
        model = load_pretrained(base)
        delta.apply_bitdelta(model, d)
        held = split.heldout["statements"]
        with torch.no_grad():
            ppl = [tasks.perplexity(load_pretrained(base), held), tasks.perplexity(load_pretrained(ft), held),
                   tasks.perplexity(model, held)]
        kept = (ppl[0] - ppl[2]) / (ppl[0] - ppl[1])
        print(f"  held-out 'statements' perplexity: base {ppl[0]:.2f}, fine-tune {ppl[1]:.2f}, "
              f"BitDelta {ppl[2]:.2f} (keeps {kept:.0%} of the gain before scale distillation)")


if __name__ == "__main__":
    raise SystemExit(main())
