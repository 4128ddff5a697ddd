"""Hessian-based optimizers: ferrox.optim SophiaH / AdaHessian vs
pytorch-optimizer (kozistr) on the same MLP.

Cases ``*-update``: the state update alone. Both sides get the same
gradients and the same Hutchinson estimate (ferrox as z and Hz, fused into
the update; pytorch-optimizer as z ⊙ Hz through its ``step(hessian=...)``),
hyperparameters mapped (below), and must agree to 1e-6 before timing. Cases
``*-step``: the whole step, each side drawing its own probe and running the
Hessian-vector product (the same closure, ``loss.backward(create_graph=True)``).

Mapping (pytorch-optimizer SophiaH: θ −= lr'·clamp(m / max(h, ε'), ±p)):
ours θ −= lr·clip(m / max(ρh, ε), 1) ⇔ lr' = lr/ρ, p = ρ, ε' = ε/ρ, and λ' = λ·ρ
(its decoupled decay is 1 − lr'·λ'). AdaHessian:
the same formula on both sides (lr/(1−β1^t), (v/(1−β2^t))^(k/2) + ε).

Optimizer-state memory (``python benches/bench_optim.py [--quick]``, to
benches/results/optim_state_memory.md): bytes of the tensors in each
optimizer's ``state_dict()`` after one step, for ferrox and pytorch-optimizer
SophiaH/AdaHessian, torch AdamW, ferrox MKOR and MeZO.

``python benches/bench_optim.py --time-to-target [--quick]``: steps and
seconds to a target loss on scikit-learn digits (MLP) and on the tiny GPT
(byte-level, a local synthetic corpus), 3 seeds, for MKOR, SophiaH, SophiaG,
AdaHessian, AdamW and SGD-momentum, each at its best LR of a grid (see
``time_to_target``); results in benches/results/optim_time_to_target.md.
"""

import math
import sys
import time

import torch

NAME = "optim"
CASES = ["sophiah-update", "adahessian-update", "sophiah-step", "adahessian-step"]
MAIN_COMPARATOR = "pytorch-optimizer"

LR, RHO, EPS, WD, BETAS_S = 1e-3, 0.04, 1e-12, 0.1, (0.965, 0.99)
LR_A, BETAS_A, EPS_A = 0.05, (0.9, 0.999), 1e-4


def _model(quick):
    # 13.7M parameters at full size (the issue's earlier numbers were on a 12.6M MLP), 1.6M quick.
    width = 1024 if quick else 2048
    depth = 1 if quick else 3
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, width), torch.nn.Tanh()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    layers += [torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 512, generator=g), torch.randint(0, 10, (64,), generator=g)


def _closure(model, x, y):
    def closure():
        for p in model.parameters():
            p.grad = None
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=True)
        return loss
    return closure


def _make(kind, side, params):
    from pytorch_optimizer import AdaHessian as PoAda, SophiaH as PoSophia

    from ferrox.optim import AdaHessian, SophiaH
    if kind == "sophiah":
        if side == "ferrox":
            return SophiaH(params, lr=LR, betas=BETAS_S, rho=RHO, weight_decay=WD, eps=EPS, update_period=1)
        return PoSophia(params, lr=LR / RHO, betas=BETAS_S, p=RHO, eps=EPS / RHO, weight_decay=WD * RHO, update_period=1)
    if side == "ferrox":
        return AdaHessian(params, lr=LR_A, betas=BETAS_A, eps=EPS_A, update_period=1)
    return PoAda(params, lr=LR_A, betas=BETAS_A, eps=EPS_A, update_period=1)


def setup(case, quick):
    from ferrox.optim import _hessian
    kind, what = case.split("-")
    x, y = _data()
    sides = {}
    for side in ("ferrox", "pytorch-optimizer"):
        model = _model(quick)
        sides[side] = {"model": model, "opt": _make(kind, side, list(model.parameters()))}
    # One gradient and one Hutchinson estimate, shared by both sides.
    ref = _model(quick)
    _closure(ref, x, y)()
    params = list(ref.parameters())
    zs, hzs = _hessian.hutchinson(params, list(range(len(params))), seed=0, counter=0)
    grads = [p.grad.detach().clone() for p in params]
    hess = [z * h for z, h in zip(zs, hzs)]
    # AdaHessian: pytorch-optimizer gets z ⊙ Hz as its step(hessian=) takes
    # it; ferrox gets what its step() passes (the MLP has no conv kernel).
    conv = [h.dim() == 4 for h in hzs]
    return {"kind": kind, "what": what, "x": x, "y": y, "sides": sides, "grads": grads, "zs": zs, "hzs": hzs,
            "hess": hess, "ds_or_hz": [_spatial(h) if c else hz for h, hz, c in zip(hess, hzs, conv)],
            "probes": [None if c else z for z, c in zip(zs, conv)]}


def _update(d, side):
    s = d["sides"][side]
    model, opt = s["model"], s["opt"]
    params = list(model.parameters())
    for p, g in zip(params, d["grads"]):
        p.grad = g
    if side == "ferrox":
        if d["kind"] == "sophiah":
            # The fused update with the given estimate (the part of step() after the HVP).
            opt._update_group(opt.param_groups[0], params, (d["zs"], d["hzs"], 1.0), 0, len(params))
        else:
            # As AdaHessian.step passes them: Hz with its probe z (D = z ⊙ Hz
            # formed in the kernel), block-averaged D for conv kernels.
            opt.count("hessian_updates")
            t = opt.advance_step()
            opt._update_group(opt.param_groups[0], params, d["ds_or_hz"], t, int(opt.stats["hessian_updates"]),
                              probes=d["probes"])
    else:
        opt.step(hessian=d["hess"])
    # No copy (it would be timed on both sides): run.py checks the warm-up
    # results before any later run moves these parameters again.
    return [p.detach() for p in params]


def _spatial(t):
    from ferrox.optim import _hessian
    return _hessian.spatial_average(t)


def _step(d, side):
    s = d["sides"][side]
    return float(s["opt"].step(_closure(s["model"], d["x"], d["y"])).detach())


def _run(side):
    def run(d):
        return _update(d, side) if d["what"] == "update" else _step(d, side)
    return run


SIDES = {"ferrox": _run("ferrox"), "pytorch-optimizer": _run("pytorch-optimizer")}


def check(results, case, inputs):
    a, b = results["ferrox"], results["pytorch-optimizer"]
    if inputs["what"] == "update":
        err = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert err <= 1e-6, f"{case}: params differ by {err:.3g} (> 1e-6)"
    else:
        # Each side draws its own probes; the loss (computed before the update) must match.
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"{case}: loss {a} vs {b}"


def state_bytes(opt) -> int:
    """Bytes of tensors kept in the optimizer's per-parameter state."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------- time to target

def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def _corpus(n_bytes=1 << 15):
    # A local, repetitive byte corpus (no downloads): words from a small vocabulary.
    g = torch.Generator().manual_seed(0)
    words = [b"the", b"curvature", b"optimizer", b"step", b"hessian", b"clip", b"loss", b"model", b"rust", b"kernel"]
    out = bytearray()
    while len(out) < n_bytes:
        out += words[int(torch.randint(0, len(words), (1,), generator=g))] + b" "
    return torch.tensor(list(out[:n_bytes]), dtype=torch.long)


SECOND_ORDER = ("SophiaH", "SophiaG", "AdaHessian")


def _optimizers(quick):
    """name -> (factory(model, lr), LR grid): 3 LRs a factor ~3 apart around
    each optimizer's usual range (quick: the middle one)."""
    from ferrox.optim import MKOR, AdaHessian, SophiaG, SophiaH
    table = {
        # MKOR rescales its step to the gradient's norm: SGD-momentum's grid.
        "MKOR": (lambda m, lr: MKOR(m.parameters(), model=m, lr=lr, momentum=0.9), [0.03, 0.1, 0.3]),
        "SophiaH": (lambda m, lr: SophiaH(m.parameters(), lr=lr, weight_decay=0.0, update_period=5), [3e-3, 1e-2, 3e-2]),
        "SophiaG": (lambda m, lr: SophiaG(m.parameters(), lr=lr, weight_decay=0.0, update_period=5), [3e-3, 1e-2, 3e-2]),
        "AdaHessian": (lambda m, lr: AdaHessian(m.parameters(), lr=lr), [0.03, 0.1, 0.3]),
        "AdamW": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), [3e-3, 1e-2, 3e-2]),
        "SGD-momentum": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), [0.03, 0.1, 0.3]),
    }
    return {k: (make, lrs[1:2] if quick else lrs) for k, (make, lrs) in table.items()}


TTT_TASKS = {
    "digits": "scikit-learn digits (1797×64, full batch), MLP 64-32-10 (tanh), train cross-entropy",
    "tiny-gpt": "ferrox.testing.tiny_gpt (dim 32, 1 layer, 2 heads, ffn 64), byte-level, local word corpus "
                "(32 KiB), batch 8×32, a fresh batch each step (seeded by step), train cross-entropy of that batch",
}
# The same tiny GPT to a lower loss: 2.5 nats is about the corpus' byte
# unigram entropy, 1.5 needs the within-word structure.
TTT_TASKS["tiny-gpt-1.5"] = TTT_TASKS["tiny-gpt"]
GPT_TARGETS = {"tiny-gpt": 2.5, "tiny-gpt-1.5": 1.5}


def _task(name, quick):
    """(model(seed), batch(step), target loss, step budget) of a time-to-target task."""
    if name == "digits":
        x, y = _digits()

        def model(seed):
            torch.manual_seed(seed)
            return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

        def batch(step):
            return x, y
        return model, batch, 0.1, (150 if quick else 400)
    from ferrox.testing.tiny_gpt import TinyGPT, TinyGPTConfig
    data = _corpus()
    cfg = TinyGPTConfig(dim=32, n_layers=1, n_heads=2, ffn=64, max_seq=32)
    seq, bs = 32, 8

    def model(seed):
        return TinyGPT(cfg, seed=seed)

    def batch(step):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, data.numel() - seq - 1, (bs,), generator=g)
        chunk = torch.stack([data[i:i + seq + 1] for i in idx.tolist()])
        return chunk[:, :-1], chunk[:, 1:]
    return model, batch, GPT_TARGETS[name], (60 if quick else 300)


def _run_to_target(name, make, lr, make_model, batch, target, max_steps, seed):
    """Steps and seconds until the step's loss is below target (None: not
    within max_steps), the last loss and the seconds per step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = make_model(seed)
    opt = make(model, lr)
    second = name in SECOND_ORDER
    t0, hit, loss = time.perf_counter(), None, float("nan")
    for step in range(max_steps):
        x, y = batch(step)

        def closure():
            opt.zero_grad()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward(create_graph=second)
            return (loss, logits) if name == "SophiaG" else loss
        with sdpa_kernel(SDPBackend.MATH):  # double backward needs the math attention path
            out = opt.step(closure)
        loss = float((out[0] if isinstance(out, tuple) else out).detach())
        if not math.isfinite(loss):
            break
        if loss < target:
            hit = step + 1
            break
    wall = time.perf_counter() - t0
    steps_run = hit if hit is not None else step + 1
    return {"seed": seed, "steps": hit, "seconds": wall if hit is not None else None, "last_loss": loss,
            "s_per_step": wall / steps_run}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


MAX_EXTENSIONS = 2


def time_to_target(quick=False, tasks=tuple(TTT_TASKS), only=None):
    """Every optimizer at every LR of its grid on every seed; the tuned LR is
    the one reaching the target on the most seeds, then in the fewest mean
    steps. While the tuned LR is at an edge of the grid (and strictly better
    than its neighbour), the grid grows past that edge by its ratio, at most
    MAX_EXTENSIONS times. Returns {"runs": [...], "best": [...]}."""
    seeds = [0] if quick else [0, 1, 2]
    runs, best = [], []
    for task in tasks:
        make_model, batch, target, max_steps = _task(task, quick)
        for name, (make, lrs) in _optimizers(quick).items():
            if only and name not in only:
                continue
            def score(r):
                return (r["reached"], -(r["mean_steps"] or 0))
            per_lr = {}
            todo, extended = list(lrs), 0
            while todo:
                lr = todo.pop(0)
                hits = [_run_to_target(name, make, lr, make_model, batch, target, max_steps, s) for s in seeds]
                done = [h for h in hits if h["steps"] is not None]
                row = {"task": task, "optimizer": name, "lr": lr, "target": target, "max_steps": max_steps,
                       "reached": len(done), "seeds": len(seeds), "runs": hits,
                       "mean_steps": _mean([h["steps"] for h in done]),
                       "mean_seconds": _mean([h["seconds"] for h in done]),
                       "s_per_step": _mean([h["s_per_step"] for h in hits])}
                runs.append(row)
                per_lr[lr] = row
                print(f"{task} {name} lr={lr:g}: {len(done)}/{len(seeds)} reached, mean steps {row['mean_steps']}, "
                      f"{row['s_per_step'] * 1e3:.1f} ms/step", flush=True)
                if todo or extended == MAX_EXTENSIONS or len(per_lr) < 2:
                    continue
                # A best LR at the edge of the grid is not tuned: one more LR
                # beyond that edge, at the grid's ratio.
                tried = sorted(per_lr)
                top = max(tried, key=lambda x: score(per_lr[x]))
                if score(per_lr[top]) == score(per_lr[tried[-2 if top == tried[-1] else 1]]):
                    continue
                if top == tried[-1]:
                    todo.append(float(f"{tried[-1] * tried[-1] / tried[-2]:.2g}"))
                elif top == tried[0]:
                    todo.append(float(f"{tried[0] * tried[0] / tried[1]:.2g}"))
                extended += bool(todo)
            best.append(max(per_lr.values(), key=score))
    return {"runs": runs, "best": best}


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def write_time_to_target(res, quick, out_dir):
    """benches/results/optim_time_to_target.{md,json}."""
    import json
    import os
    import platform
    import subprocess
    stem = os.path.join(out_dir, "optim_time_to_target" + ("_quick" if quick else ""))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"quick": quick, "commit": commit, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": TTT_TASKS,
            "lr_grids": {k: v[1] for k, v in _optimizers(quick).items()}}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, **res}, f, indent=1)
    seeds = res["best"][0]["seeds"] if res["best"] else 0
    lines = [f"## optim: time to target loss{' (quick)' if quick else ''}", "",
             f"{seeds} seeds (model init; the tiny-GPT batches are the same for every run), each optimizer at every LR of "
             "its grid; the tuned LR reaches the target on the most seeds, then in the fewest mean steps; a grid whose "
             f"best LR sat at an edge was extended past it by the grid's ratio (at most {MAX_EXTENSIONS} LRs). "
             "Steps and wall-clock are means over the seeds that reached the target (wall-clock includes the "
             "closure's forward/backward; the Hessian-based optimizers run `backward(create_graph=True)`). "
             f"Shared, loaded {os.cpu_count()}-core box (other jobs running): seconds are noisy, steps are not. "
             f"Commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} torch threads.", ""]
    for task, desc in TTT_TASKS.items():
        rows = [r for r in res["best"] if r["task"] == task]
        if not rows:
            continue
        lines += [f"### {task}: target loss < {rows[0]['target']} within {rows[0]['max_steps']} steps", "", desc, "",
                  "| optimizer | tuned lr | reached | mean steps | steps per seed | mean s to target | ms/step | LRs tried |",
                  "|---|---:|---:|---:|---|---:|---:|---|"]
        for r in rows:
            per = ", ".join("—" if h["steps"] is None else str(h["steps"]) for h in r["runs"])
            grid = ", ".join(f"{x['lr']:g}" for x in sorted((q for q in res["runs"] if q["task"] == task and q["optimizer"] == r["optimizer"]), key=lambda q: q["lr"]))
            lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['reached']}/{r['seeds']} | {_fmt(r['mean_steps'], '.1f')} | "
                         f"{per} | {_fmt(r['mean_seconds'], '.2f')} | {r['s_per_step'] * 1e3:.1f} | {grid} |")
        lines += ["", "Every LR (reached / mean steps):", ""]
        for name in meta["lr_grids"]:
            cells = [f"{r['lr']:g}: {r['reached']}/{r['seeds']}, {_fmt(r['mean_steps'], '.0f')}"
                     for r in sorted(res["runs"], key=lambda q: q["lr"]) if r["task"] == task and r["optimizer"] == name]
            if cells:
                lines.append(f"- {name}: " + "; ".join(cells))
        lines.append("")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {stem}.md/.json")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def state_dict_bytes(opt) -> int:
    """Bytes of every tensor in ``opt.state_dict()`` (per-parameter state,
    and ferrox's global state: MKOR's inverses, counters)."""
    return _tensor_bytes(opt.state_dict())


def _state_memory(quick):
    """Optimizer-state bytes after one real step on the bench MLP, per
    optimizer: ferrox and pytorch-optimizer SophiaH/AdaHessian, torch AdamW,
    ferrox MKOR (fp16 inverses + inner SGD momentum) and MeZO."""
    from pytorch_optimizer import AdaHessian as PoAda, SophiaH as PoSophia

    from ferrox.optim import MKOR, AdaHessian, MeZO, SophiaH
    x, y = _data()
    makers = {
        "ferrox SophiaH": lambda m: SophiaH(m.parameters(), lr=LR, update_period=1),
        "pytorch-optimizer SophiaH": lambda m: PoSophia(m.parameters(), lr=LR / RHO, p=RHO, update_period=1),
        "ferrox AdaHessian": lambda m: AdaHessian(m.parameters(), lr=LR_A, update_period=1),
        "pytorch-optimizer AdaHessian": lambda m: PoAda(m.parameters(), lr=LR_A, update_period=1),
        "torch AdamW (foreach)": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
        "ferrox MKOR (fp16 factors, inner SGD-momentum)": lambda m: MKOR(m.parameters(), model=m, lr=0.01),
        "ferrox MeZO": lambda m: MeZO(m.parameters(), lr=1e-6),
    }
    out = {}
    for name, make in makers.items():
        model = _model(quick)
        opt = make(model)
        if "MeZO" in name:
            with torch.no_grad():
                opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        elif "Sophia" in name or "AdaHessian" in name:
            opt.step(_closure(model, x, y))
        else:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        params = sum(p.numel() for p in model.parameters())
        out[name] = {"params": params, "state_bytes": state_dict_bytes(opt),
                     "per_param_state_bytes": state_bytes(opt)}
        del opt, model
    return out


def write_state_memory(res, quick, out_dir):
    """benches/results/optim_state_memory.{md,json}."""
    import json
    import os
    import subprocess
    stem = os.path.join(out_dir, "optim_state_memory" + ("_quick" if quick else ""))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    params = next(iter(res.values()))["params"]
    with open(stem + ".json", "w") as f:
        json.dump({"meta": {"quick": quick, "commit": commit, "torch": torch.__version__, "params": params}, "rows": res},
                  f, indent=1)
    lines = [f"## optim: optimizer-state memory{' (quick)' if quick else ''}", "",
             f"The bench MLP ({params / 1e6:.1f}M f32 parameters), after one step; bytes of every tensor in "
             f"`state_dict()` (ferrox's includes its global state: MKOR's fp16 inverses, step and probe counters, "
             f"stats). Commit {commit}, torch {torch.__version__}.", "",
             "| optimizer | state MiB | state bytes | bytes per parameter |", "|---|---:|---:|---:|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['state_bytes'] / 2**20:.1f} | {r['state_bytes']} | {r['state_bytes'] / r['params']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import os
    quick = "--quick" in sys.argv
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if "--time-to-target" in sys.argv:
        write_time_to_target(time_to_target(quick), quick, results)
    else:
        write_state_memory(_state_memory(quick), quick, results)
