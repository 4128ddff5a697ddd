"""Gradient-sketch data attribution in the style of TRAK (Park et al.,
"TRAK: Attributing Model Behavior at Scale", 2023).

Each training example ``z_i`` gets a feature ``φ_i = P ∇_θ f(z_i; θ)``: the
gradient of a model *output* ``f`` (for classification TRAK uses the margin
``log p(y|x) - log(1 - p(y|x))``, see :func:`margin_output`) with respect to
a chosen set of parameters, projected to ``proj_dim`` dimensions by
:func:`project`. With ``Φ`` the [n_train, p] matrix of those features the
score of train example i for eval example e is

    τ[i, e] = φ_i (ΦᵀΦ + λI)⁻¹ φ_eᵀ · Q_i,

``Q_i = -∂loss/∂f`` at ``z_i`` (TRAK's "out-to-loss" weight; for the margin
with cross-entropy it is ``1 - p(y_i|x_i)``, :func:`margin_out_to_loss`).
The inverse is never formed: the Gram matrix is factored once with
``torch.linalg.cholesky`` and ``cholesky_solve`` applies it. Sign
convention: τ > 0 means example i *raises* f on e, and removing a set S
changes f(e) by about ``-Σ_{i∈S} τ[i, e]`` (exactly the one-Newton-step
change for a quadratic loss, e.g. ridge regression without projection).

Several checkpoints (``load_checkpoint(..., model_id=m)``) give an ensemble:
``score`` returns the mean over checkpoints of each checkpoint's τ (TRAK
averages the kernel and the Q weights separately; the mean of products is
what is implemented here).

The projection (in the Rust core on the CPU, ``cuda/importance.cu`` on a
GPU) is ``P = G·Rᵀ/√p`` with a
Rademacher ``R`` that is a fixed function of (seed, i, j) and is generated
on the fly, never stored: ``R[i, j] = -1`` iff bit ``j % 32`` of Philox
element ``j // 32`` of stream (seed, i) is set (``ferrox._core.philox_bits``
with ``stream=i`` gives those words). The f32 sums run in one fixed order
(columns in groups of 4, each group summed from 0, the groups added in
ascending order; see ``rust/core/src/importance/project.rs``), so the result
has the same bits for any thread count, and the CUDA kernel follows the
same order (bitwise the CPU's in the host simulation).
"""

import os

import numpy as np
import torch

from .. import _core

__all__ = ["project", "TRAKer", "margin_output", "margin_out_to_loss", "module_seed"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def project(grads, p, seed=0, out=None, gram=None):
    """``grads`` [n, d] (or [d]) float32/float16/bfloat16 → float32 [n, p]
    (or [p]) = ``grads·Rᵀ/√p``, on the CPU or, for a CUDA tensor, on its
    GPU (torch's current stream). Both run the same sums in the same order
    over the same Philox signs, so a CUDA result has the CPU's bits; the GPU
    tests hold it to 1e-5 relative (and the signs exactly). Tensors on
    another device are projected on the CPU and the result moved back.

    ``out``: a float32 [n, p] tensor on the projection's device to write
    into. ``gram``: a [p, p] tensor on that device (float32 or float64) to
    accumulate ``ΦᵀΦ`` into (``gram += outᵀ·out``, a torch GEMM in gram's
    dtype), as TRAK's finalize needs."""
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"grads: expected a torch.Tensor, got {type(grads).__name__}")
    if grads.dtype not in _FLOATS:
        raise TypeError(f"grads: expected dtype float32, float16 or bfloat16, got {grads.dtype}")
    if grads.dim() not in (1, 2):
        raise ValueError(f"grads: expected shape [n, d] or [d], got {list(grads.shape)}")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"p: expected a positive int, got {p!r}")
    # numpy integers too (seeds often come from np.random), as sampled_gradient takes them; bools are not seeds
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2^64), got {seed!r}")
    seed = int(seed)
    one = grads.dim() == 1
    g = grads.detach().reshape(1, -1) if one else grads.detach()
    dev = g.device
    on_gpu = dev.type == "cuda"
    g = g.contiguous() if on_gpu else g.cpu().contiguous()
    run_dev = g.device
    if out is None:
        res = torch.empty(g.shape[0], p, dtype=torch.float32, device=run_dev)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device != run_dev:
            raise ValueError(f"out: expected a float32 tensor on {run_dev}")
        if list(out.shape) != [g.shape[0], p]:
            raise ValueError(f"out: expected shape {[g.shape[0], p]}, got {list(out.shape)}")
        res = out
    if gram is not None:
        if (not isinstance(gram, torch.Tensor) or gram.dtype not in (torch.float32, torch.float64)
                or gram.device != run_dev or list(gram.shape) != [p, p]):
            raise ValueError(f"gram: expected a float32/float64 [{p}, {p}] tensor on {run_dev}")
    if on_gpu:
        with torch.cuda.device(run_dev):
            stream = torch.cuda.current_stream(run_dev).cuda_stream
            _core.importance_project(g, seed, p, res, stream=stream)
    else:
        _core.importance_project(g, seed, p, res)
    if gram is not None:
        gram.addmm_(res.T.to(gram.dtype), res.to(gram.dtype))
    if out is not None:
        return out
    res = res.to(dev)
    return res[0] if one else res


def module_seed(seed, k):
    """The projection seed of the k-th parameter tensor with ``per_module``."""
    return (seed + (k + 1) * 0x9E3779B97F4A7C15) % 2**64


def margin_output(model, x, y):
    """TRAK's classification output for one example: the margin
    ``logit_y - logsumexp(other logits)`` (= log p/(1-p))."""
    logits = model(x.unsqueeze(0))[0]
    # A mask rather than logits[y]: it works under vmap.
    mine = torch.arange(logits.shape[-1], device=logits.device) == y
    correct = (logits * mine).sum()
    return correct - torch.logsumexp(logits.masked_fill(mine, float("-inf")), dim=-1)


def margin_out_to_loss(model, x, y):
    """``-∂(cross-entropy)/∂margin = 1 - p(y|x)`` for one example."""
    logits = model(x.unsqueeze(0))[0]
    mine = torch.arange(logits.shape[-1], device=logits.device) == y
    return 1 - (torch.softmax(logits, dim=-1) * mine).sum()


def _select(model, params):
    named = [(n, q) for n, q in model.named_parameters()]
    if params is None:
        keep = [n for n, q in named if q.requires_grad]
    elif callable(params):
        keep = [n for n, q in named if params(n, q)]
    else:
        names = dict(named)
        keep = list(params)
        for n in keep:
            if n not in names:
                raise ValueError(f"params: {n!r} is not a parameter of the model")
    if not keep:
        raise ValueError("params: no parameters selected")
    return keep


class TRAKer:
    """TRAK-style attribution over a streamed training set.

    ``output_fn(model, *example) -> scalar`` is the model output f for ONE
    example (tensors without the batch dimension; ``model`` is a callable
    standing for the model with the current parameters — call it on batched
    inputs, e.g. ``model(x.unsqueeze(0))``). ``out_to_loss(model, *example)``
    gives ``Q = -∂loss/∂f`` for that example (None: Q = 1). Defaults: the
    classification margin and ``1 - p``.

    ``params``: None (all parameters that require grad), a list of names, or
    ``fn(name, param) -> bool``. ``proj_dim=None`` keeps the full gradient
    (no projection). ``lambda_``: the ridge term added to ΦᵀΦ; None means
    ``1e-6 × mean diagonal``. ``save_dir``: features are kept in
    memory-mapped ``.npy`` files there with a mask of featurized indices, so
    an interrupted run resumes (already featurized indices are skipped).
    ``per_module=True``: each selected parameter tensor's gradient is
    projected on its own to ``proj_dim`` (seed ``module_seed(seed, k)`` for
    the k-th name) and the pieces are concatenated (feature dim = proj_dim ×
    number of tensors), so the full flat gradient is never built.
    """

    def __init__(self, model, train_size, output_fn=margin_output, out_to_loss=margin_out_to_loss,
                 params=None, proj_dim=2048, seed=0, lambda_=None, save_dir=None, per_module=False):
        if not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size: expected a positive int, got {train_size!r}")
        if proj_dim is not None and (not isinstance(proj_dim, int) or proj_dim < 1):
            raise ValueError(f"proj_dim: expected a positive int or None, got {proj_dim!r}")
        if lambda_ is not None and not (lambda_ >= 0):
            raise ValueError(f"lambda_: expected a number >= 0, got {lambda_!r}")
        self.model, self.train_size = model, train_size
        self.output_fn, self.out_to_loss = output_fn, out_to_loss
        self.names = _select(model, params)
        self.seed, self.lambda_ = seed, lambda_
        plist = dict(model.named_parameters())
        self.grad_dim = sum(plist[n].numel() for n in self.names)
        self.proj_dim = proj_dim
        if per_module and proj_dim is None:
            raise ValueError("per_module: needs a proj_dim")
        self.per_module = bool(per_module)
        self.dim = self.grad_dim if proj_dim is None else proj_dim * (len(self.names) if per_module else 1)
        self.save_dir = save_dir
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
        self._feat, self._q, self._done = {}, {}, {}
        self._solved = {}
        self.model_id = None

    # -- checkpoints ----------------------------------------------------
    def load_checkpoint(self, state_dict, model_id=0):
        """Switch to a checkpoint (``state_dict`` or None for the model as it is)."""
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model_id = model_id
        if model_id not in self._feat:
            self._feat[model_id], self._q[model_id], self._done[model_id] = self._storage(model_id)

    def _storage(self, m):
        n, k = self.train_size, self.dim
        if self.save_dir is None:
            return (np.zeros((n, k), np.float32), np.zeros(n, np.float32), np.zeros(n, bool))
        paths = [os.path.join(self.save_dir, f"{name}_{m}.npy") for name in ("features", "q", "done")]
        specs = [((n, k), np.float32), ((n,), np.float32), ((n,), np.bool_)]
        out = []
        for path, (shape, dt) in zip(paths, specs):
            if os.path.exists(path):
                a = np.load(path, mmap_mode="r+")
                if a.shape != shape or a.dtype != dt:
                    raise ValueError(f"save_dir: {path} holds {a.dtype} {a.shape}, expected {np.dtype(dt)} {shape}")
            else:
                a = np.lib.format.open_memmap(path, mode="w+", dtype=dt, shape=shape)
            out.append(a)
        return tuple(out)

    def _need(self):
        if self.model_id is None:
            self.load_checkpoint(None, 0)

    # -- features -------------------------------------------------------
    def _features(self, batch):
        """(φ [B, dim] float32 cpu, Q [B] float32 cpu) for a batch (tuple of tensors)."""
        from torch.func import functional_call, grad, vmap

        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        params = {n: q.detach() for n, q in self.model.named_parameters()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        sel = {n: params[n] for n in self.names}

        def call_with(p_sel):
            full = {**params, **p_sel}
            return lambda *a, **k: functional_call(self.model, (full, buffers), a, k)

        def f(p_sel, *ex):
            return self.output_fn(call_with(p_sel), *ex)

        g = vmap(grad(f), in_dims=(None,) + (0,) * len(batch))(sel, *batch)
        rows = [g[n].detach().reshape(g[n].shape[0], -1).float() for n in self.names]
        with torch.no_grad():
            if self.out_to_loss is None:
                q = torch.ones(rows[0].shape[0])
            else:
                q = vmap(lambda *ex: self.out_to_loss(call_with(sel), *ex))(*batch)
        if self.per_module:
            phi = torch.cat([project(r, self.proj_dim, module_seed(self.seed, k)).cpu()
                             for k, r in enumerate(rows)], dim=1)
        else:
            flat = torch.cat(rows, dim=1)
            phi = flat.cpu() if self.proj_dim is None else project(flat, self.proj_dim, self.seed)
        return phi.cpu(), q.detach().float().cpu()

    def featurize(self, batch, indices):
        """Featurize training examples ``indices`` (ints in [0, train_size))."""
        self._need()
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.train_size):
            raise ValueError(f"indices: expected values in [0, {self.train_size}), got {idx.min()}..{idx.max()}")
        m = self.model_id
        done = self._done[m]
        todo = ~done[idx]
        if not todo.any():
            return
        if not todo.all():
            sel = torch.as_tensor(np.nonzero(todo)[0])
            batch = tuple(b[sel.to(b.device)] for b in (batch if isinstance(batch, (tuple, list)) else (batch,)))
            idx = idx[todo]
        phi, q = self._features(batch)
        if phi.shape[0] != idx.size:
            raise ValueError(f"indices: {idx.size} indices for a batch of {phi.shape[0]} examples")
        self._feat[m][idx] = phi.numpy()
        self._q[m][idx] = q.numpy()
        done[idx] = True
        self._solved.pop(m, None)

    def finalize(self, chunk=4096):
        """Gram ΦᵀΦ (float64, accumulated over row chunks), + λI, Cholesky
        factor; stores Φ(ΦᵀΦ + λI)⁻¹ per checkpoint for ``score``."""
        if not self._feat:
            raise ValueError("finalize: nothing featurized yet")
        for m, feat in self._feat.items():
            missing = int((~self._done[m]).sum())
            if missing:
                raise ValueError(f"finalize: checkpoint {m} has {missing} training examples not featurized")
            k = feat.shape[1]
            gram = torch.zeros(k, k, dtype=torch.float64)
            for s in range(0, feat.shape[0], chunk):
                c = torch.from_numpy(np.asarray(feat[s:s + chunk])).double()
                gram += c.T @ c
            lam = self.lambda_ if self.lambda_ is not None else 1e-6 * float(gram.diagonal().mean())
            gram.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(gram)
            if int(info) != 0:
                raise ValueError(f"finalize: ΦᵀΦ + λI is not positive definite (λ = {lam:g}); pass a larger lambda_")
            solved = np.empty_like(feat) if self.save_dir is None else np.lib.format.open_memmap(
                os.path.join(self.save_dir, f"solved_{m}.npy"), mode="w+", dtype=np.float32, shape=feat.shape)
            for s in range(0, feat.shape[0], chunk):
                c = torch.from_numpy(np.asarray(feat[s:s + chunk])).double()
                solved[s:s + chunk] = torch.cholesky_solve(c.T, chol).T.float().numpy()
            self._solved[m] = solved

    def score(self, eval_batch, checkpoints=None, out_path=None):
        """τ [n_train, n_eval] float32 (mean over the checkpoints' scores).
        ``checkpoints``: {model_id: state_dict} to evaluate each eval feature
        under its checkpoint (None: the model as it is, for a single one).
        ``out_path``: also write τ there as a ``.npy`` file (memory-mappable)."""
        if not self._solved or set(self._solved) != set(self._feat):
            raise ValueError("score: call finalize() first")
        ids = sorted(self._solved)
        if checkpoints is None and len(ids) > 1:
            raise ValueError("checkpoints: several checkpoints were featurized; pass {model_id: state_dict}")
        total = None
        for m in ids:
            if checkpoints is not None:
                self.model.load_state_dict(checkpoints[m])
            phi_e, _ = self._features(eval_batch)
            s = torch.from_numpy(np.asarray(self._solved[m])) @ phi_e.T
            s *= torch.from_numpy(np.asarray(self._q[m]))[:, None]
            total = s if total is None else total + s
        total /= len(ids)
        if out_path is not None:
            mm = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=tuple(total.shape))
            mm[:] = total.numpy()
            mm.flush()
            del mm
        return total
