"""ferrox.codebook.joint: JLCM-style joint learning of codebooks and
assignments with a proximal STE, against plain STE, on MiniLM matrices with
MiniLM activations (ferrox.testing.minilm), plus naive references for the
autograd function, the assignment rules and the hooks."""

import pytest
import torch
from hypothesis import given, strategies as st

from ferrox.codebook import joint
from ferrox.codebook.joint import capture_inputs, input_gram, learn_codebook, output_error

# MiniLM matrices (rows subsampled to keep the test fast) at 3 bits: the
# same steps, learning rates and initial k-means codebook for both rules.
MATRICES = {"encoder.layer.0.attention.self.query": 96, "encoder.layer.5.output.dense": 64}
BITS, STEPS, ASSIGN_LR = 3, 30, 0.01


def lloyd(w, k, iters=25):
    """Plain 1-D Lloyd from quantiles (the initial codebook; ties of the
    assignment to the lower codeword)."""
    v = w.reshape(-1).float()
    c = torch.quantile(v, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    for _ in range(iters):
        q = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        c = torch.stack([v[q == j].mean() if bool((q == j).any()) else c[j] for j in range(k)]).sort().values
    return c, torch.bucketize(v, (c[1:] + c[:-1]) / 2).view_as(w)


def kmeans_init(w, bits):
    """ferrox.codebook.kmeans's codebook (the per-tensor k-means start) and
    the nearest-codeword codes (ties to the lower codeword)."""
    from ferrox.codebook import kmeans

    c = kmeans(w, bits=bits).codebook.float()
    return c, torch.bucketize(w.float(), (c[1:] + c[:-1]) / 2)


@pytest.fixture(scope="module")
def minilm_runs():
    from ferrox.testing import minilm

    model, tok = minilm.load()
    train = [a for a, _ in minilm.sentence_pairs("statements")][:48]
    held = [a for a, _ in minilm.sentence_pairs("datamodel", heldout=True)][:32]

    def batches(sentences):
        for i in range(0, len(sentences), 16):
            yield minilm.tokenize(tok, sentences[i:i + 16])

    x = capture_inputs(model, list(MATRICES), batches(train))
    xh = capture_inputs(model, list(MATRICES), batches(held))
    mods = dict(model.named_modules())
    out = {}
    for name, rows in MATRICES.items():
        w = mods[name].weight.detach()[:rows].clone()
        c, q = kmeans_init(w, BITS)
        out[name] = {"w": w, "x": x[name], "xh": xh[name], "c": c, "q": q}
        for assign in joint.ASSIGN:
            out[name][assign] = learn_codebook(w, c, q, x[name], steps=STEPS, lr=1e-3, assign=assign,
                                               assign_lr=ASSIGN_LR, heldout_inputs=xh[name], progress=False)
    return out


def test_proximal_ste_makes_smaller_jumps_and_beats_plain_ste_held_out(minilm_runs):
    for name, r in minilm_runs.items():
        prox, ste = r["proximal"][3], r["ste"][3]
        print(f"{name}: held-out error k-means {prox.heldout_initial:.4f}, proximal {prox.heldout_final:.4f}, "
              f"plain STE {ste.heldout_final:.4f}; mean jump {prox.mean_jump:.3f} vs {ste.mean_jump:.3f} codes, "
              f"{prox.mean_jump_gap:.3f} vs {ste.mean_jump_gap:.3f} mean gaps, max {prox.max_jump} vs {ste.max_jump}")
        assert prox.max_jump == 1 and prox.jumps and len(prox.jumps) == 1  # only ±1 moves
        assert prox.mean_jump <= ste.mean_jump and prox.max_jump <= ste.max_jump
        assert prox.mean_jump_gap < ste.mean_jump_gap  # ψ damps moves across wide gaps
        assert prox.heldout_final < ste.heldout_final, name


def test_joint_learning_lowers_the_layer_output_error(minilm_runs):
    for name, r in minilm_runs.items():
        for assign in joint.ASSIGN:
            cb, codes, sc, s = r[assign]
            # the proximal STE by a margin; plain STE (the baseline) at least somewhat
            bound = 0.8 * s.initial_loss if assign == "proximal" else s.initial_loss
            assert s.final_loss < bound, (name, assign, s.initial_loss, s.final_loss)
            assert s.heldout_final < s.heldout_initial, (name, assign)
            # the returned state really has the reported loss (naive recomputation, float64)
            w_hat = sc[:, None] * cb[0][codes.long()]
            assert output_error(r["w"], w_hat, input_gram(r["x"])) == pytest.approx(s.final_loss, rel=1e-4)
            assert output_error(r["w"], w_hat, input_gram(r["xh"])) == pytest.approx(s.heldout_final, rel=1e-4)
            assert s.loss[s.best_step] == s.final_loss == min(s.loss)


def test_codebook_stays_sorted_and_codes_in_range(minilm_runs):
    for r in minilm_runs.values():
        for assign in joint.ASSIGN:
            cb, codes, sc, _ = r[assign]
            assert cb.shape == (1, 2 ** BITS) and cb.dtype == torch.float32
            assert bool((cb[:, 1:] >= cb[:, :-1]).all())
            assert codes.dtype == torch.uint8 and codes.shape == r["w"].shape and int(codes.max()) < 2 ** BITS
            assert sc.shape == (r["w"].shape[0],) and bool(torch.isfinite(sc).all())


def test_groups_each_keep_a_sorted_codebook_and_learn():
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.randn(24, 32, generator=g) * 0.02, torch.randn(40, 32, generator=g) * 0.2])
    # correlated inputs (as real activations): assignments can compensate each other's errors
    x = torch.randn(256, 8, generator=g) @ torch.randn(8, 32, generator=g) + 0.1 * torch.randn(256, 32, generator=g)
    cs, qs = zip(*(lloyd(part, 4) for part in (w[:24], w[24:])))
    c, q = torch.stack(cs), torch.cat(qs)
    offsets = torch.tensor([0, 24, 64], dtype=torch.int32)
    for assign in joint.ASSIGN:
        cb, codes, sc, s = learn_codebook(w, c, q, x, group_offsets=offsets, steps=25, assign=assign, assign_lr=0.01)
        assert cb.shape == (2, 4) and bool((cb[:, 1:] >= cb[:, :-1]).all())
        rg = torch.repeat_interleave(torch.arange(2), torch.tensor([24, 40]))
        w_hat = sc[:, None] * cb[rg[:, None], codes.long()]
        assert output_error(w, w_hat, input_gram(x)) == pytest.approx(s.final_loss, rel=1e-4)
        assert s.final_loss < s.initial_loss


def _naive_psi(grad_u, up_gap, down_gap, mean_gap):
    towards = torch.where(grad_u < 0, up_gap, down_gap)
    return torch.where(towards > 0, 2.0 / (1.0 + (towards / mean_gap) ** 2), torch.zeros(()))


@pytest.mark.parametrize("proximal", [False, True])
def test_decode_function_gradients_match_a_naive_reference(proximal):
    g = torch.Generator().manual_seed(3)
    k, rows, cols = 4, 6, 10
    cb = torch.randn(2, k, generator=g).sort(dim=1).values
    codes = torch.randint(0, k, (rows, cols), generator=g)
    row_group = torch.tensor([0, 0, 0, 1, 1, 1])
    idx = row_group[:, None] * k + codes
    sc = torch.rand(rows, generator=g) + 0.5
    flat = cb.reshape(-1)
    up = torch.where(codes < k - 1, flat[(idx + 1).clamp(max=2 * k - 1)] - flat[idx], torch.zeros(()))
    down = torch.where(codes > 0, flat[idx] - flat[(idx - 1).clamp(min=0)], torch.zeros(()))
    mean_gap = ((cb[:, -1] - cb[:, 0]) / (k - 1))[row_group][:, None]
    target = torch.randn(rows, cols, generator=g)

    a, s1, lat = cb.clone().requires_grad_(), sc.clone().requires_grad_(), torch.zeros(rows, cols, requires_grad=True)
    out = joint._decode_fn().apply(a, s1, lat, idx, up, down, mean_gap, proximal)
    ((out - target) ** 2).sum().backward()

    b, s2 = cb.clone().requires_grad_(), sc.clone().requires_grad_()
    ref = s2[:, None] * b.reshape(-1)[idx]  # plain torch gather: autograd's own gradients
    assert torch.equal(out.detach(), ref.detach())
    ((ref - target) ** 2).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-6)
    grad_u = 2 * (ref.detach() - target) * sc[:, None]
    want = grad_u * (_naive_psi(grad_u, up, down, mean_gap) if proximal else 1)
    torch.testing.assert_close(lat.grad, want, rtol=1e-6, atol=1e-6)


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 4, 8, 16]))
def test_assignment_rules_match_naive_references(seed, k):
    """Nearest codeword (plain STE) and nearest of j−1, j, j+1 (proximal),
    against a float64 argmin; ties to the lower index (a repeated codeword,
    or distances within 1e-9 of each other, where midpoint rounding may pick
    either)."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(2, k, generator=g).sort(dim=1).values
    cb[1, 1] = cb[1, 0]  # a repeated codeword
    row_group = torch.tensor([0, 0, 1, 1, 1])
    v = torch.randn(5, 7, generator=g) * 1.5
    codes = torch.randint(0, k, (5, 7), generator=g)
    near = joint._nearest(cb, v, row_group)
    prox = joint._proximal(cb, v, codes, row_group)

    def lowest_nearest(d, cand):
        best = min(d[x] for x in cand)
        return [x for x in cand if d[x] - best <= 1e-9]

    for r in range(5):
        c = cb[row_group[r]].double()
        for i in range(7):
            d = (v[r, i].double() - c).abs().tolist()
            ok = lowest_nearest(d, range(k))
            assert int(near[r, i]) in ok and (len(ok) > 1 or int(near[r, i]) == ok[0])
            if c[ok[0]] == c[ok[-1]]:  # equal codewords: exactly the lowest
                assert int(near[r, i]) == ok[0]
            here = int(codes[r, i])
            cand = [x for x in (here - 1, here, here + 1) if 0 <= x < k]
            okp = lowest_nearest(d, cand)
            # the element stays on a tie with its own codeword
            assert int(prox[r, i]) == here if here in okp else int(prox[r, i]) in okp


def test_sorting_the_codebook_keeps_the_decoded_weight():
    g = torch.Generator().manual_seed(5)
    cb = torch.randn(2, 8, generator=g)  # unsorted
    codes = torch.randint(0, 8, (4, 9), generator=g)
    rg = torch.tensor([0, 0, 1, 1])
    sorted_cb, new_codes = joint._sort_codebook(cb, codes, rg)
    assert bool((sorted_cb[:, 1:] >= sorted_cb[:, :-1]).all())
    assert torch.equal(sorted_cb[rg[:, None], new_codes], cb[rg[:, None], codes])


def test_capture_inputs_records_each_modules_inputs_and_removes_its_hooks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    xs = [torch.randn(2, 4, 5), torch.randn(3, 4, 5)]
    got = capture_inputs(net, ["0", "2"], xs)
    assert torch.equal(got["0"], torch.cat([x.reshape(-1, 5) for x in xs]))
    assert torch.equal(got["2"], torch.cat([torch.relu(net[0](x)).reshape(-1, 7) for x in xs]).detach())
    assert not net[0]._forward_hooks and not net[2]._forward_hooks
    assert capture_inputs(net, {"first": net[0]}, xs, max_rows=10)["first"].shape == (10, 5)
    with pytest.raises(ValueError, match="not modules of the model"):
        capture_inputs(net, ["9"], xs)
    with pytest.raises(ValueError, match="received no inputs"):
        capture_inputs(net, {"other": torch.nn.Linear(5, 5)}, xs)


def test_bad_arguments_are_refused_by_name():
    w = torch.randn(4, 6)
    c, q = lloyd(w, 4)
    x = torch.randn(10, 6)
    with pytest.raises(ValueError, match="assign"):
        learn_codebook(w, c, q, x, assign="nearest")
    with pytest.raises(ValueError, match=r"codes: expected values in \[0, 3\]"):
        learn_codebook(w, c, q + 4, x)
    with pytest.raises(ValueError, match="codes: expected shape"):
        learn_codebook(w, c, q[:, :3], x)
    with pytest.raises(ValueError, match="group_offsets"):
        learn_codebook(w, torch.stack([c, c]), q, x)
    with pytest.raises(ValueError, match="group_offsets"):
        learn_codebook(w, torch.stack([c, c]), q, x, group_offsets=[0, 3, 2])
    with pytest.raises(ValueError, match=r"calib_inputs: expected layer inputs \[\.\.\., 6\]"):
        learn_codebook(w, c, q, torch.randn(10, 5))
    with pytest.raises(ValueError, match="steps"):
        learn_codebook(w, c, q, x, steps=-1)
    with pytest.raises(ValueError, match="assign_lr"):
        learn_codebook(w, c, q, x, assign_lr=float("nan"))
