"""The shared tiny-GPT task: a byte-level Llama-layout GPT, the
``pydoc_data.topics`` corpus split, deterministic training, perplexity and
the checkpoint cache (``ferrox.testing``).

The trained checkpoints come from the cache (``tasks.pretrained`` and
``tasks.fine_tuned``): the first run on a machine trains them (about a
minute or two on 2 cores), later runs load them.
"""

import json
import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from ferrox.checkpoint import read_checkpoint
from ferrox.merge import merge_checkpoints, parse_config
from ferrox.testing import TinyGPT, TinyGPTConfig, corpus, load_pretrained, save_pretrained, tasks

SMALL = TinyGPTConfig(dim=32, n_layers=2, n_heads=2, ffn=64, max_seq=64)


def llama_names(n_layers):
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return names


@pytest.fixture(scope="session")
def trained():
    """(base folder, {part: fine-tune folder}) for seed 0, from the cache."""
    return tasks.pretrained(0), {p: tasks.fine_tuned(p, 0) for p in corpus.FINETUNE_TOPICS}


@pytest.fixture(scope="session")
def split():
    return corpus.split(0)


# --- the model ---------------------------------------------------------------


def test_state_dict_has_llama_names_and_default_size():
    cfg = TinyGPTConfig()
    model = TinyGPT(cfg, seed=0)
    sd = model.state_dict()
    assert set(sd) == llama_names(cfg.n_layers)
    assert 1_000_000 <= sum(t.numel() for t in sd.values()) == cfg.n_params() <= 5_000_000
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (cfg.ffn, cfg.dim)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (cfg.dim, cfg.ffn)
    assert sd["lm_head.weight"].shape == (256, cfg.dim)
    assert sd["lm_head.weight"].data_ptr() != sd["model.embed_tokens.weight"].data_ptr()  # untied


def test_forward_shapes_causality_and_errors():
    model = TinyGPT(SMALL, seed=1)
    ids = tasks.encode("def f(x):\n    return x\n")
    logits = model(ids)
    assert logits.shape == (ids.numel(), 256)
    assert model(ids.unsqueeze(0).repeat(3, 1)).shape == (3, ids.numel(), 256)
    # causal: changing a later byte leaves earlier positions' logits alone
    other = ids.clone()
    other[10] = (other[10] + 1) % 256
    out = model(other)
    assert torch.equal(out[:10], logits[:10]) and not torch.equal(out[10:], logits[10:])
    with pytest.raises(ValueError, match="max_seq 64"):
        model(torch.zeros(65, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        TinyGPTConfig(dim=30, n_heads=4)


def test_same_seed_same_init():
    a, b, c = TinyGPT(SMALL, seed=3), TinyGPT(SMALL, seed=3), TinyGPT(SMALL, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_save_load_round_trip_is_bitwise(tmp_path):
    model = TinyGPT(SMALL, seed=5)
    folder = save_pretrained(model, tmp_path / "m")
    info = read_checkpoint(folder)
    assert {t.name for t in info.tensors} == llama_names(SMALL.n_layers)
    assert {t.dtype for t in info.tensors} == {"F32"}
    assert info.total_params == SMALL.n_params()
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (32, 2, 64)
    back = load_pretrained(folder)
    assert back.config == SMALL
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = tasks.encode("round trip")
    assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_precision_save_loads(tmp_path, dtype, name):
    model = TinyGPT(SMALL, seed=6)
    folder = save_pretrained(model, tmp_path / "m", dtype=dtype)
    assert {t.dtype for t in read_checkpoint(folder).tensors} == {name}
    back = load_pretrained(folder)
    assert back.lm_head.weight.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(dtype).float()), k


def test_load_refuses_mismatched_weights(tmp_path):
    folder = save_pretrained(TinyGPT(SMALL, seed=0), tmp_path / "m")
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["ferrox_tiny_gpt"]["ffn"] = 96
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.* has shape"):
        load_pretrained(folder)


def test_transformers_llama_computes_the_same_logits(tmp_path):
    """The saved folder is a real Llama checkpoint: Hugging Face's
    LlamaForCausalLM (installed with mergekit) gives the same logits."""
    import transformers  # a test dependency (mergekit's)
    model = TinyGPT(SMALL, seed=7)
    with torch.no_grad():  # non-trivial norm weights, so their placement is checked too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    folder = save_pretrained(model, tmp_path / "m")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = tasks.encode("class A:\n    def __init__(self): pass\n").unsqueeze(0)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


# --- data, perplexity, training -----------------------------------------------


def test_split_parts_are_disjoint_and_held_out(split):
    parts = split.parts
    assert parts[0] == "pretrain" and len(split.finetune) >= 2
    seen = {}
    for part, keys in split.topics.items():
        for k in keys:
            assert k not in seen, f"topic {k!r} in {seen.get(k)} and {part}"
            seen[k] = part
    assert set(seen) <= set(corpus.topics())
    # the fine-tuning parts are what the docstring says they are
    assert "compound" in split.topics["statements"] and "specialnames" in split.topics["datamodel"]
    assert set(split.topics["datamodel"]) <= set(corpus.DATAMODEL_TOPICS)
    train = [split.train_text(p) for p in parts]
    for part in parts:
        held = [p for p in split.heldout[part].split("\n\n") if len(p) >= corpus.DEDUP_MIN_CHARS]
        assert len(held) >= 20, part
        for para in held:
            assert not any(para in t for t in train), f"held-out paragraph of {part} is in training text: {para[:60]!r}"
    sizes = split.sizes()
    for part, (n_train, n_held) in sizes.items():
        assert n_train >= 60_000 and n_held >= 8_000, (part, n_train, n_held)
        assert 0.08 <= n_held / (n_train + n_held) <= 0.17, part
    assert sum(a + b for a, b in sizes.values()) >= 300_000


def test_split_is_fixed_and_seed_moves_the_held_out_bin(split):
    again = corpus.split.__wrapped__(0)  # recomputed, not the cached object
    assert again.digest() == split.digest() and again == split
    other = corpus.split(1)
    assert other.digest() != split.digest()
    for part in split.parts:
        assert other.heldout[part] != split.heldout[part]
        for para in other.heldout[part].split("\n\n"):
            if len(para) >= corpus.DEDUP_MIN_CHARS:
                assert para not in other.train_text(part)


def test_encode_and_batches():
    ids = tasks.encode("aé")
    assert ids.tolist() == [97, 0xC3, 0xA9] and ids.dtype == torch.long
    assert tasks.decode(ids) == "aé"
    text = "".join(chr(32 + i % 90) for i in range(1000))
    a, b = tasks.batches(text, 16, 4, seed=9), tasks.batches(text, 16, 4, seed=9)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
        windows = tasks.encode(text).unfold(0, 17, 1)
        for row_x, row_y in zip(xa, ya):  # each row is a real window of the text
            assert (windows == torch.cat([row_x, row_y[-1:]])).all(1).any()
    x1 = next(tasks.batches(text, 16, 4, seed=10))[0]
    assert not torch.equal(x1, next(tasks.batches(text, 16, 4, seed=9))[0])
    with pytest.raises(ValueError, match="too short"):
        next(tasks.batches("abc", 16, 4, seed=0))


def test_perplexity_matches_a_naive_reference():
    model = TinyGPT(SMALL, seed=8)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tasks.encode(text)
    seq, max_tokens = 16, 100  # 6 full windows of 16 predictions + one of 4
    nll = 0.0
    with torch.no_grad():
        for start in range(0, max_tokens, seq):
            end = min(start + seq, max_tokens)
            logits = model(ids[start:end])
            nll += float(F.cross_entropy(logits, ids[start + 1: end + 1], reduction="sum"))
    ref = math.exp(nll / max_tokens)
    got = tasks.perplexity(model, text, seq_len=seq, max_tokens=max_tokens, batch_size=4)
    assert got == pytest.approx(ref, rel=1e-5)
    assert got == tasks.perplexity(model, text, seq_len=seq, max_tokens=max_tokens, batch_size=4)
    # an untrained model (std 0.02 weights) is close to the uniform 256
    assert 200 < got < 320


@pytest.mark.parametrize("threads", [1, tasks.TRAIN_THREADS])
def test_training_is_deterministic_and_leaves_global_state_alone(threads):
    text = corpus.split(0).finetune["statements"][:20_000]
    outer_threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    a, b, c = TinyGPT(SMALL, seed=0), TinyGPT(SMALL, seed=0), TinyGPT(SMALL, seed=0)
    la = tasks.train(a, text, 4, 3e-3, seed=11, batch_size=4, seq_len=32, warmup=2, threads=threads)
    lb = tasks.train(b, text, 4, 3e-3, seed=11, batch_size=4, seq_len=32, warmup=2, threads=threads)
    tasks.train(c, text, 4, 3e-3, seed=12, batch_size=4, seq_len=32, warmup=2, threads=threads)
    assert la == lb
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, TinyGPT(SMALL, seed=0).lm_head.weight)  # it did train
    assert torch.get_num_threads() == outer_threads and torch.equal(torch.get_rng_state(), rng)


def test_lr_schedule():
    lrs = [tasks.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


# --- the cache ----------------------------------------------------------------


def test_cache_builds_once_under_concurrency_and_never_publishes_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROX_CACHE", str(tmp_path))
    calls = []

    def build(tmp):
        calls.append(tmp)
        save_pretrained(TinyGPT(SMALL, seed=0), tmp)
        return {"stage": "test"}

    results = []
    threads = [threading.Thread(target=lambda: results.append(tasks._cached("thing", build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert results[0] == os.path.join(tasks.cache_dir(), "thing")
    assert tasks.cache_dir().startswith(str(tmp_path))
    assert load_pretrained(results[0]).config == SMALL
    assert not [n for n in os.listdir(tasks.cache_dir()) if ".tmp-" in n]

    def broken(tmp):
        save_pretrained(TinyGPT(SMALL, seed=0), tmp)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tasks._cached("other", broken)
    assert not os.path.exists(os.path.join(tasks.cache_dir(), "other"))
    assert not [n for n in os.listdir(tasks.cache_dir()) if ".tmp-" in n]
    # a killed trainer's temporary folder is cleared by the next one
    os.makedirs(os.path.join(tasks.cache_dir(), ".other.tmp-999999999", "junk"))
    assert tasks._cached("other", build) == os.path.join(tasks.cache_dir(), "other")
    assert not [n for n in os.listdir(tasks.cache_dir()) if ".tmp-" in n]


def test_cache_key_covers_the_recipe(monkeypatch):
    key = tasks.cache_key()
    monkeypatch.setattr(tasks, "FINETUNE", tasks.Recipe(steps=tasks.FINETUNE.steps + 1, lr=tasks.FINETUNE.lr))
    assert tasks.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(tasks, "CODE_VERSION", tasks.CODE_VERSION + 1)
    assert tasks.cache_key() != key
    with pytest.raises(ValueError, match="unknown part"):
        tasks.fine_tuned("nope")


# --- the trained models (cached) -----------------------------------------------


def test_fine_tunes_beat_the_base_on_their_own_held_out_text(trained, split):
    base_dir, fts = trained
    base = load_pretrained(base_dir)
    base_ppl = {p: tasks.perplexity(base, split.heldout[p]) for p in split.parts}
    assert base_ppl["pretrain"] < 16, base_ppl  # far below the uniform 256
    for part, folder in fts.items():
        ft = load_pretrained(folder)
        own = tasks.perplexity(ft, split.heldout[part])
        assert own <= 0.9 * base_ppl[part], (part, own, base_ppl[part])
    with open(os.path.join(fts["statements"], "ferrox_training.json")) as f:
        assert json.load(f)["stage"] == "finetune"


def test_merge_of_the_fine_tunes_loads_back(trained, split, tmp_path):
    base_dir, fts = trained
    cfg = parse_config({
        "merge_method": "ties", "base_model": base_dir,
        "models": [{"model": f, "parameters": {"weight": 1.0, "density": 0.5}} for f in fts.values()],
        "dtype": "float32", "out_dtype": "bfloat16",
    })
    out = str(tmp_path / "merged")
    report = merge_checkpoints(cfg, out, progress=False)
    assert report.merged == len(llama_names(TinyGPTConfig().n_layers))
    assert {t.dtype for t in read_checkpoint(out).tensors} == {"BF16"}
    merged = load_pretrained(out)
    ppl = tasks.perplexity(merged, split.heldout["pretrain"], max_tokens=4096)
    assert math.isfinite(ppl) and ppl < 32
