"""``make demo``: the main job on the embedded default model.

Inspects the real all-MiniLM-L6-v2 checkpoint, makes two fine-tunes of it on
the fly (seeded synthetic task vectors), reports how the task vectors relate,
merges them with Model Breadcrumbs + TIES (per-row bands) through the same
path as ``ferrox merge``, and reports what the merge kept.
"""

import os
import tempfile
import time

from . import checkpoint, synthetic
from .merge import TaskVector, load_state_dict, merge_checkpoints, parse_config
from .models import default_model_path


def main() -> int:
    base = default_model_path()
    info = checkpoint.read_checkpoint(base)
    print(f"default model: {base}\n  {len(info.tensors)} tensors, {info.total_params:,} parameters, "
          f"{checkpoint.human_bytes(info.total_bytes)}")
    with tempfile.TemporaryDirectory(prefix="ferrox-demo-") as tmp:
        fts = [synthetic.fine_tune(base, os.path.join(tmp, f"task{i}"), seed=100 + i, sparsity=0.6) for i in range(2)]
        sd_base = load_state_dict(base)
        tvs = [TaskVector.from_state_dicts(sd_base, load_state_dict(f)) for f in fts]
        print(f"task vectors: 2 synthetic fine-tunes, cosine(task0, task1) = {tvs[0].cosine(tvs[1]):+.4f}")
        cfg = parse_config({
            "merge_method": "breadcrumbs_ties", "base_model": base,
            "models": [{"model": f, "parameters": {"weight": 1.0, "keep_frac": 0.2, "outlier_frac": 0.01}} for f in fts],
            "parameters": {"granularity": "row"},
        })
        out = os.path.join(tmp, "merged")
        start = time.perf_counter()
        report = merge_checkpoints(cfg, out, progress=False)
        elapsed = time.perf_counter() - start
        merged_tv = TaskVector.from_state_dicts(sd_base, load_state_dict(out))
        print(f"merged with breadcrumbs_ties (keep 20%, drop top 1% per row) in {elapsed:.2f} s "
              f"-> {checkpoint.human_bytes(report.bytes_written)} in {os.path.basename(out)}/")
        print("per-layer fraction of weights changed by the merge:")
        layers = {}
        for name, frac in report.density.items():
            key = ".".join(name.split(".")[:3]) if ".layer." in name else name.split(".")[0]
            layers.setdefault(key, []).append(frac)
        for key, fracs in layers.items():
            print(f"  {key:<24} {sum(fracs) / len(fracs):6.1%}")
        for i, tv in enumerate(tvs):
            print(f"cosine(merged, task{i}) = {merged_tv.cosine(tv):+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
