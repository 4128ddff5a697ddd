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

Optimizer-state memory: ``state_bytes`` (both keep two f32 tensors per
parameter; pytorch-optimizer also keeps the Hessian estimate between steps).

``python benches/bench_optim.py --time-to-target [--quick]``: steps and
seconds to a target loss on scikit-learn digits (MLP) and on the tiny GPT
(byte-level, a local synthetic corpus), for SophiaH, SophiaG, AdaHessian,
AdamW and SGD-momentum (LRs from a small grid, best per optimizer).
"""

import sys
import time

import torch

NAME = "optim"
CASES = ["sophiah-update", "adahessian-update", "sophiah-step", "adahessian-step"]
MAIN_COMPARATOR = "pytorch-optimizer"

LR, RHO, EPS, WD, BETAS_S = 1e-3, 0.04, 1e-12, 0.1, (0.965, 0.99)
LR_A, BETAS_A, EPS_A = 0.05, (0.9, 0.999), 1e-4


def _model(quick):
    # 12.6M parameters at full size (the measurement), 0.8M quick.
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
    # AdaHessian's D (block-averaged for conv kernels; the MLP has none): both sides get it precomputed.
    return {"kind": kind, "what": what, "x": x, "y": y, "sides": sides, "grads": grads, "zs": zs, "hzs": hzs,
            "hess": hess, "ds": [_spatial(h) for h in hess]}


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
            opt.global_state["stat_hessian_updates"] += 1
            t = opt.advance_step()
            opt._update_group(opt.param_groups[0], params, d["ds"], t, int(opt.global_state["stat_hessian_updates"]))
    else:
        opt.step(hessian=d["hess"])
    return [p.detach().clone() for p in params]


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


def _optimizers():
    from ferrox.optim import AdaHessian, SophiaG, SophiaH
    return {
        "SophiaH": (lambda ps, lr: SophiaH(ps, lr=lr, weight_decay=0.0, update_period=5), [3e-3, 1e-2, 3e-2]),
        "SophiaG": (lambda ps, lr: SophiaG(ps, lr=lr, weight_decay=0.0, update_period=5), [3e-3, 1e-2, 3e-2]),
        "AdaHessian": (lambda ps, lr: AdaHessian(ps, lr=lr), [0.03, 0.1, 0.3]),
        "AdamW": (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0), [1e-3, 3e-3, 1e-2]),
        "SGD-momentum": (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), [0.03, 0.1, 0.3]),
    }


def _task(name, quick):
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
    return model, batch, 2.5, (60 if quick else 300)


def time_to_target(quick=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    seeds = [0] if quick else [0, 1, 2]
    rows = []
    for task in ("digits", "tiny-gpt"):
        make_model, batch, target, max_steps = _task(task, quick)
        for name, (make, lrs) in _optimizers().items():
            best = None
            for lr in (lrs[1:2] if quick else lrs):
                hits = []
                for seed in seeds:
                    model = make_model(seed)
                    opt = make(model.parameters(), lr)
                    second = name in ("SophiaH", "SophiaG", "AdaHessian")
                    t0, hit = time.perf_counter(), None
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
                        loss = float(out[0] if isinstance(out, tuple) else out)
                        if loss < target:
                            hit = (step + 1, time.perf_counter() - t0)
                            break
                    hits.append(hit)
                done = [h for h in hits if h is not None]
                score = (len(done), -sum(h[0] for h in done) / max(1, len(done)))
                if best is None or score > best[0]:
                    best = (score, lr, hits)
            _, lr, hits = best
            done = [h for h in hits if h is not None]
            rows.append({"task": task, "optimizer": name, "lr": lr, "target": target, "reached": f"{len(done)}/{len(hits)}",
                         "mean_steps": sum(h[0] for h in done) / len(done) if done else None,
                         "mean_seconds": sum(h[1] for h in done) / len(done) if done else None})
            print(rows[-1], flush=True)
    return rows


def _state_memory(quick):
    out = {}
    for kind in ("sophiah", "adahessian"):
        d = setup(f"{kind}-update", quick)
        for side in ("ferrox", "pytorch-optimizer"):
            _update(d, side)
            out[f"{kind}/{side}"] = state_bytes(d["sides"][side]["opt"])
    return out


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    if "--time-to-target" in sys.argv:
        time_to_target(quick)
    else:
        for k, v in _state_memory(quick).items():
            print(f"{k}: optimizer state {v / 2**20:.1f} MiB")
