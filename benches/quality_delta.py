"""BitDelta quality and storage, measured (no timings; these numbers do not
depend on the machine): writes ``benches/results/delta_quality.{md,json}``.

- storage: delta bytes against an fp16 delta of the compressed matrices, and
  the whole folder against the fp16 model, for the MiniLM fine-tune
  (``ferrox.testing.minilm``), the tiny GPT (seed 0) and a synthetic bf16
  Llama-layout model of ~370M parameters (the merge benchmark's shape; a
  seeded random fine-tune);
- tiny GPT, 5 seeds (pretrained on ``pretrain``, fine-tuned on
  ``statements``; held-out ``statements`` perplexity): base, fine-tune,
  BitDelta (α = mean|Δ|), after distilling one α per matrix and one per row
  (the recipe of ``tests/test_delta_quality.py``), and the share of the
  fine-tune's gain each keeps;
- MiniLM: cosine of held-out sentence embeddings to the fine-tune's, and the
  held-out last-hidden-state MSE, for the base, BitDelta and distilled.

Usage: ``.venv/bin/python benches/quality_delta.py [--seeds 0,1,2,3,4] [--skip-large]``.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def storage_row(label, base, ft):
    from ferrox import delta

    start = time.perf_counter()
    d = delta.compress(base, ft, progress=False)
    s = d.report()["summary"]
    return {"model": label, "matrices": s["compressed_matrices"], "delta_bytes": s["delta_bytes"],
            "fp16_delta_bytes": s["fp16_delta_bytes"], "ratio_vs_fp16_delta": s["ratio_vs_fp16_delta"],
            "folder_bytes": s["folder_tensor_bytes"], "fp16_model_bytes": s["fp16_model_bytes"],
            "fp16_model_over_folder": s["ratio_vs_fp16_model"], "compress_seconds": round(time.perf_counter() - start, 2)}


def tiny_gpt_rows(seeds):
    from test_delta_quality import DISTILL, PART, calibration

    from ferrox import delta
    from ferrox.testing import corpus, load_pretrained, tasks

    held = corpus.split(0).heldout[PART]
    rows = []
    for seed in seeds:
        base, ft = tasks.pretrained(seed), tasks.fine_tuned(PART, seed)
        d = delta.compress(base, ft, progress=False)
        ppl = {"base": tasks.perplexity(load_pretrained(base), held), "ft": tasks.perplexity(load_pretrained(ft), held)}
        m = load_pretrained(base)
        delta.apply_bitdelta(m, d)
        ppl["bitdelta"] = tasks.perplexity(m, held)
        for label, per_row in (("distilled_matrix", False), ("distilled_row", True)):
            with tasks._threads(tasks.TRAIN_THREADS):
                r = delta.distill(load_pretrained(base), delta.BitDelta.load(d.path), load_pretrained(ft),
                                  calibration(seed), progress=False, **dict(DISTILL, per_row=per_row))
            ppl[label] = tasks.perplexity(r.model, held)
        gain = ppl["base"] - ppl["ft"]
        row = {"seed": seed, **{k: round(v, 4) for k, v in ppl.items()}}
        row.update({f"kept_{k}": round((ppl["base"] - ppl[k]) / gain, 4) for k in ("bitdelta", "distilled_matrix", "distilled_row")})
        rows.append(row)
        print(row, flush=True)
    return rows


def minilm_rows():
    from ferrox import delta
    from ferrox.models import default_model_path
    from ferrox.testing import minilm, tasks

    ft = minilm.fine_tuned("statements", 0)
    d = delta.compress(default_model_path(), ft, progress=False)
    _, tok = minilm.load()
    ft_m, _ = minilm.load(ft)
    train = minilm.sentence_pairs("statements")
    held_s = [a for a, _ in minilm.sentence_pairs("statements", heldout=True)]
    held = [minilm.tokenize(tok, held_s)]
    calib = [minilm.tokenize(tok, [a for a, _ in train[i:i + 16]]) for i in range(0, 64, 16)]
    models = {"base": minilm.load()[0]}
    bd = minilm.load()[0]
    delta.apply_bitdelta(bd, delta.BitDelta.load(d.path))
    models["bitdelta"] = bd
    for label, per_row in (("distilled_matrix", False), ("distilled_row", True)):
        with tasks._threads(tasks.TRAIN_THREADS):
            models[label] = delta.distill(minilm.load()[0], delta.BitDelta.load(d.path), ft_m, calib, steps=12,
                                          lr=0.3 if not per_row else 0.1, per_row=per_row, progress=False).model
    return [{"model": k, "cosine_to_ft": round(minilm.embedding_cosine(m, ft_m, tok, held_s), 5),
             "hidden_mse_to_ft": float(f"{delta.output_mse(m, ft_m, held):.4g}")} for k, m in models.items()]


def table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--skip-large", action="store_true", help="no ~370M-parameter synthetic model")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    from ferrox import synthetic
    from ferrox.models import default_model_path
    from ferrox.testing import minilm, tasks

    report = {"storage": [storage_row("MiniLM (contrastive fine-tune)", default_model_path(), minilm.fine_tuned("statements", 0)),
                          storage_row("tiny GPT seed 0", tasks.pretrained(0), tasks.fine_tuned("statements", 0))]}
    if not args.skip_large:
        tmp = tempfile.mkdtemp(prefix="ferrox-quality-")
        try:
            base = synthetic.make_llama(os.path.join(tmp, "base"), hidden=1024, layers=24, intermediate=2816,
                                        vocab=32000, max_shard_bytes=1 << 30)
            ft = synthetic.fine_tune(base, os.path.join(tmp, "ft"), seed=1, scale=0.002, max_shard_bytes=1 << 30)
            report["storage"].append(storage_row("synthetic Llama bf16 ~370M", base, ft))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(report["storage"]), flush=True)
    report["tiny_gpt"] = tiny_gpt_rows([int(s) for s in args.seeds.split(",")])
    report["minilm"] = minilm_rows()
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "delta_quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = ["# BitDelta quality and storage", "", "Written by `benches/quality_delta.py` (see its docstring).", "",
          "## Storage", "", table(report["storage"]), "",
          "## Tiny GPT: held-out 'statements' perplexity (kept = share of the fine-tune's gain over the base)", "",
          table(report["tiny_gpt"]), "", "## MiniLM: held-out sentence embeddings against the fine-tune", "",
          table(report["minilm"]), ""]
    with open(os.path.join(args.results, "delta_quality.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
