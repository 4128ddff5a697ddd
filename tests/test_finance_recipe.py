"""The documented finance recipe (examples/finance_recipe.yml) does what it
says: base + τ_instruct + τ_domain, with independent task vectors."""

import os

import torch
import yaml

from ferrox import synthetic
from ferrox.merge import TaskVector, load_state_dict, merge_checkpoints, parse_config

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "finance_recipe.yml")


def test_finance_recipe_adds_both_task_vectors(tmp_path):
    base = synthetic.make_llama(tmp_path / "base", hidden=64, layers=2)
    synthetic.fine_tune(base, tmp_path / "instruct", seed=1)
    synthetic.fine_tune(base, tmp_path / "domain_cpt", seed=2)
    with open(EXAMPLE) as f:
        raw = yaml.safe_load(f)
    merge_checkpoints(parse_config(raw, str(tmp_path)), tmp_path / "out", progress=False)

    b, inst, cpt = (load_state_dict(tmp_path / n) for n in ("base", "instruct", "domain_cpt"))
    merged = load_state_dict(tmp_path / "out")
    for name, w in b.items():
        want = (w.float() + (inst[name].float() - w.float()) + (cpt[name].float() - w.float())).to(torch.bfloat16)
        assert torch.equal(merged[name], want), name
    # Independently fine-tuned: the two task vectors are nearly orthogonal.
    assert abs(TaskVector.from_state_dicts(b, inst).cosine(TaskVector.from_state_dicts(b, cpt))) < 0.05
