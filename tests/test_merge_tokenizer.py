"""Tokenizer merges (``tokenizer_source``, the ``tokenizer:`` block,
``chat_template``) against mergekit 0.1.5 on tiny Llama-layout models whose
small WordLevel tokenizers (built here with ``tokenizers``) differ.

mergekit's union appends the tokens its base lacks in hash-map order (it
varies between runs), so the bitwise parity tests give the union exactly one
such word (its id is then fixed) and compare vocabularies, ids and tensors
exactly; the test with several new words compares rows token by token.
"""

import json
import os

import mergekit_parity
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from ferrox import synthetic
from ferrox.merge import ConfigError, merge_checkpoints, parse_config
from ferrox.merge.checkpoints import MergeError
from ferrox.merge.tokenizer import Ref, TokenizerSpec, TokenSource, TokenSpec, align_rows, build_vocab

pytest.importorskip("mergekit")

HIDDEN = 16


def make_model(folder, words, special=(), seed=0, dtype=torch.float32, tok_config=True):
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens([AddedToken(s, special=True) for s in special])
    n = tok.get_vocab_size(with_added_tokens=True)
    synthetic.make_llama(folder, hidden=HIDDEN, layers=1, vocab=n, dtype=dtype, seed=seed)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if tok_config:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": words[0]}, f)
    return str(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """a: the base; b and c share the one word a lacks ('dog') and one added
    special ('<x>'); 'on' is in a and c only, 'sat' in a only; ids differ."""
    root = tmp_path_factory.mktemp("tok")
    a = make_model(root / "a", ["<unk>", "the", "cat", "sat", "on"], ["<s>"], seed=0)
    b = make_model(root / "b", ["<unk>", "dog", "the", "cat"], ["<s>", "<x>"], seed=1)
    c = make_model(root / "c", ["<unk>", "on", "cat", "dog", "the"], ["<x>", "<s>"], seed=2)
    return root, a, b, c


def run_mergekit(raw, out, **options):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts = dict(allow_crimes=True, quiet=True, copy_tokenizer=False, write_model_card=False)
    opts.update(options)
    run_merge(MergeConfiguration.model_validate(raw), str(out), options=MergeOptions(**opts),
              config_source=yaml.safe_dump(raw))


def fx_merge(raw, out):
    return merge_checkpoints(parse_config(raw), str(out), progress=False)


def tensors(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def vocab(folder):
    return Tokenizer.from_file(os.path.join(str(folder), "tokenizer.json")).get_vocab(with_added_tokens=True)


def config(folder):
    with open(os.path.join(str(folder), "config.json")) as f:
        return json.load(f)


def assert_same_output(fx, mk, dense=None, spec=None):
    """Same vocabulary (token -> id), config vocab_size and tensors: bitwise,
    or with ``dense`` (the input folders) within mergekit_parity's 4-ulp rule
    (a linear merge of three models, whose sum mergekit reduces in another
    order), the ulp taken of the largest input at each element (inputs
    re-indexed to the output vocabulary)."""
    assert vocab(fx) == vocab(mk)
    a, b = tensors(fx), tensors(mk)
    assert set(a) == set(b)
    if dense:
        refs = [Ref(str(m)) for m in dense]
        plan = build_vocab(spec, refs, 0)
        ins = {n: [tensors(m)[n] for m in dense] for n in a}
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if dense:
            x = ins[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                x = align_rows(plan, name, x, list(range(len(x))), 0, refs)

            mergekit_parity.check_dense(name, a[name], b[name], None, x)
        else:
            assert torch.equal(a[name], b[name]), f"{name}: max |diff| {float((a[name] - b[name]).abs().max())}"
    assert config(fx)["vocab_size"] == config(mk)["vocab_size"]


def unfused_linear(rows, weights):
    acc = torch.zeros_like(rows[0])
    for x, w in zip(rows, weights):
        acc = acc + x * torch.tensor(w, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    for w in weights:
        total = total + torch.tensor(w, dtype=torch.float32)
    return acc / total


def test_union_linear_pad_forced_tokens_and_chat_template_bitwise_mergekit(zoo, tmp_path):
    root, a, b, c = zoo
    raw = {"merge_method": "linear", "base_model": a,
           "models": [{"model": m, "parameters": {"weight": w}} for m, w in ((a, 0.5), (b, 0.3), (c, 0.2))],
           "tokenizer": {"source": "union", "pad_to_multiple_of": 8,
                         "tokens": {"<new>": {"source": {"kind": "zero"}},
                                    "cat": {"source": c, "force": True},
                                    "<s>": {"source": {"kind": "model_token", "model": b, "token": "the"},
                                            "force": True}}},
           "chat_template": "chatml", "dtype": "float32"}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    assert_same_output(tmp_path / "fx", tmp_path / "mk", dense=(a, b, c), spec=parse_config(raw).tokenizer)
    v = vocab(tmp_path / "fx")
    assert len(v) == 9 and config(tmp_path / "fx")["vocab_size"] == 16  # padded to a multiple of 8
    with open(tmp_path / "mk" / "chat_template.jinja") as f:
        template = f.read()
    with open(tmp_path / "fx" / "chat_template.jinja") as f:
        assert f.read() == template
    with open(tmp_path / "fx" / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == template
    # transformers reads the written tokenizer as mergekit's
    from transformers import AutoTokenizer

    text = "the dog sat on <x> cat <new>"
    assert (AutoTokenizer.from_pretrained(str(tmp_path / "fx"))(text)["input_ids"]
            == AutoTokenizer.from_pretrained(str(tmp_path / "mk"))(text)["input_ids"])


def test_each_tokens_row_is_the_merge_of_the_rows_of_the_models_that_have_it(zoo, tmp_path):
    """A naive reference by token string: a model lacking a token contributes
    the base's row (when the base has it), else the mean of the rows of the
    models that have it; the result is linear's weighted mean."""
    root, a, b, c = zoo
    ws = (0.5, 0.3, 0.2)
    raw = {"merge_method": "linear", "base_model": a, "tokenizer_source": "union",
           "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip((a, b, c), ws)]}
    fx_merge(raw, tmp_path / "fx")
    out, out_vocab = tensors(tmp_path / "fx"), vocab(tmp_path / "fx")
    ins = [(tensors(m), vocab(m)) for m in (a, b, c)]
    assert set(out_vocab) == set().union(*(set(v) for _, v in ins))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (len(out_vocab), HIDDEN)
        for tok, i in out_vocab.items():
            have = [t[name][v[tok]] for t, v in ins if tok in v]
            if tok in ins[0][1]:
                fill = ins[0][0][name][ins[0][1][tok]]
            else:
                fill = sum(have[1:], have[0]) / len(have)
            rows = [t[name][v[tok]] if tok in v else fill for t, v in ins]
            assert torch.equal(out[name][i], unfused_linear(rows, ws)), (name, tok)
    assert out["model.norm.weight"].shape == (HIDDEN,)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5}),
                                           ("slerp", None)])
def test_base_source_bitwise_mergekit(zoo, tmp_path, method, params):
    """tokenizer_source: base (the base's vocabulary, other rows re-indexed
    to it) with a GTA method streamed by the core and a torch method."""
    root, a, b, c = zoo
    if params is None:
        raw = {"merge_method": method, "base_model": a, "parameters": {"t": 0.3},
               "models": [{"model": a}, {"model": c}]}
    else:
        raw = {"merge_method": method, "base_model": a,
               "models": [{"model": m, "parameters": {"weight": 0.6, **params}} for m in (b, c)]}
    raw.update(tokenizer_source="base", dtype="float32")
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    if params is None:
        # Slerp of the tensors outside the vocabulary runs the core's fused
        # kernel (float64 cosine): mergekit_parity's slerp bound, not bits.
        # The re-indexed vocabulary rows take the torch path: bitwise.
        assert vocab(tmp_path / "fx") == vocab(tmp_path / "mk")
        fx, mk, ta, tc = tensors(tmp_path / "fx"), tensors(tmp_path / "mk"), tensors(a), tensors(c)
        assert set(fx) == set(mk)
        for name in fx:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                assert torch.equal(fx[name], mk[name]), name
            else:
                mergekit_parity.check_slerp(name, fx[name], mk[name], ta[name], tc[name], 0.3)
    else:
        assert_same_output(tmp_path / "fx", tmp_path / "mk")
    assert vocab(tmp_path / "fx") == vocab(a)


def test_model_source_bitwise_mergekit(zoo, tmp_path):
    root, a, b, c = zoo
    raw = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                {"model": b, "parameters": {"weight": 2.0}}],
           "tokenizer_source": b, "dtype": "float32"}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    assert_same_output(tmp_path / "fx", tmp_path / "mk")
    assert vocab(tmp_path / "fx") == vocab(b)


def test_union_of_many_new_words_matches_mergekit_token_by_token(tmp_path):
    """Several words the base lacks: their ids may differ from mergekit's
    (its order is a hash map's); each token's rows must not."""
    a = make_model(tmp_path / "a", ["<unk>", "x", "y"], seed=3)
    b = make_model(tmp_path / "b", ["<unk>", "p", "q", "y", "r"], seed=4)
    c = make_model(tmp_path / "c", ["<unk>", "s", "q", "x", "t", "p"], seed=5)
    raw = {"merge_method": "linear", "base_model": a, "tokenizer_source": "union", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": w}} for m, w in ((a, 1.0), (b, 0.5), (c, 0.25))]}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    vf, vm = vocab(tmp_path / "fx"), vocab(tmp_path / "mk")
    assert set(vf) == set(vm) and {t: vf[t] for t in vocab(a)} == {t: vm[t] for t in vocab(a)}
    # ferrox's order: new words in model order, each model's by id
    assert sorted((i, t) for t, i in vf.items() if t not in vocab(a)) == list(enumerate("pqrst", start=3))
    tf, tm = tensors(tmp_path / "fx"), tensors(tmp_path / "mk")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for tok in vf:
            assert torch.equal(tf[name][vf[tok]], tm[name][vm[tok]]), (name, tok)
    assert torch.equal(tf["model.layers.0.mlp.up_proj.weight"], tm["model.layers.0.mlp.up_proj.weight"])


def test_chat_template_alone_sets_the_donors_tokenizer_template(zoo, tmp_path):
    root, a, b, c = zoo
    literal = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    ft = str(synthetic.fine_tune(a, tmp_path / "ft", seed=9))
    raw = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                {"model": ft, "parameters": {"weight": 1.0}}],
           "chat_template": literal}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk", copy_tokenizer=True)
    for folder in ("fx", "mk"):
        with open(tmp_path / folder / "chat_template.jinja") as f:
            assert f.read() == literal, folder
    assert vocab(tmp_path / "fx") == vocab(a)
    with open(tmp_path / "fx" / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == literal


# --- the re-indexing rule, property-tested against a naive per-token loop -----

WORDS = ["<unk>"] + [f"w{i}" for i in range(10)]


@given(st.lists(st.lists(st.sampled_from(WORDS[1:]), min_size=1, max_size=6, unique=True), min_size=2, max_size=3),
       st.booleans(), st.sampled_from([None, 4, 7]))
def test_align_rows_follows_mergekit_rule(tmp_path_factory, word_lists, with_base, pad):
    root = tmp_path_factory.mktemp("prop")
    refs = [Ref(make_model(root / f"m{i}", ["<unk>"] + ws, seed=i, tok_config=False)) for i, ws in enumerate(word_lists)]
    spec = TokenizerSpec("union", {}, pad)
    plan = build_vocab(spec, refs, 0)
    ins = [(tensors(r.path)["model.embed_tokens.weight"], vocab(r.path)) for r in refs]
    out = align_rows(plan, "model.embed_tokens.weight", [t for t, _ in ins], list(range(len(refs))),
                     0 if with_base else None, refs)
    n = len(plan.vocab)
    assert n == len(set().union(*(set(v) for _, v in ins)))
    for (t, v), new in zip(ins, out):
        assert new.shape == (plan.rows, HIDDEN) and plan.rows % (pad or 1) == 0 and plan.rows - n < (pad or 1)
        for tok, i in plan.vocab.items():
            have = [(k, tt[vv[tok]]) for k, (tt, vv) in enumerate(ins) if tok in vv]
            if tok in v:
                want = t[v[tok]]
            elif len(have) == 1:
                want = have[0][1]
            elif with_base and tok in ins[0][1]:
                want = ins[0][0][ins[0][1][tok]]
            else:
                acc = torch.zeros(HIDDEN)
                for _, row in have:
                    acc = acc + row
                want = acc / len(have)
            assert torch.equal(new[i], want), tok
        if plan.rows > n:
            assert torch.equal(new[n:], new[:n].mean(0).expand(plan.rows - n, HIDDEN))


def test_forced_token_sources(zoo):
    root, a, b, c = zoo
    refs = [Ref(a), Ref(b), Ref(c)]
    spec = TokenizerSpec("base", {"the": TokenSpec(TokenSource("model", Ref(c)), force=True),
                                  "on": TokenSpec(TokenSource("model_token", Ref(b), token_id=2)),
                                  "<z>": TokenSpec(TokenSource("zero"))})
    plan = build_vocab(spec, refs, 0)
    ins = [tensors(r.path)["lm_head.weight"] for r in refs]
    out = align_rows(plan, "lm_head.weight", ins, [0, 1, 2], 0, refs)
    va, vb, vc = vocab(a), vocab(b), vocab(c)
    the, on, z = plan.vocab["the"], plan.vocab["on"], plan.vocab["<z>"]
    for k in range(3):
        assert torch.equal(out[k][the], ins[2][vc["the"]])  # forced: c's row everywhere
        assert torch.equal(out[k][z], torch.zeros(HIDDEN))
    assert torch.equal(out[0][on], ins[0][va["on"]]) and torch.equal(out[2][on], ins[2][vc["on"]])
    assert torch.equal(out[1][on], ins[1][2])  # b lacks 'on': its row 2 by token_id
    assert "dog" not in plan.vocab and len(plan.vocab) == len(va) + 1


# --- refusals -------------------------------------------------------------------

def _raw(zoo, **extra):
    root, a, b, c = zoo
    raw = {"merge_method": "linear", "base_model": a,
           "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    raw.update(extra)
    return raw


@pytest.mark.parametrize("extra,needle", [
    (dict(tokenizer_source="union", tokenizer={"source": "base"}), "give one of tokenizer_source and tokenizer"),
    (dict(tokenizer_source=3), "tokenizer_source: expected 'base', 'union' or a model path, got 3"),
    (dict(tokenizer_source="nonesuch"), "tokenizer_source: no such model file or folder"),
    (dict(tokenizer={"source": "union", "pad": 8}), "tokenizer: unknown key 'pad'"),
    (dict(tokenizer={"pad_to_multiple_of": 0}), "pad_to_multiple_of: expected an integer >= 1, got 0"),
    (dict(tokenizer={"tokens": {"<t>": {"source": {"kind": "one"}}}}), "kind must be 'zero' or 'model_token'"),
    (dict(tokenizer={"tokens": {"<t>": {"force": "yes"}}}), "force: expected true or false"),
    (dict(tokenizer={"tokens": {"<t>": {"source": {"kind": "model_token", "token": "a"}}}}),
     "kind model_token needs a model"),
    (dict(chat_template="nonesuch"), "'nonesuch' is not a template name mergekit knows"),
    (dict(chat_template="{{ x }}"), "is not a valid template"),
    (dict(chat_template=["chatml"]), "chat_template: expected a template name or Jinja text"),
])
def test_bad_tokenizer_configs_are_refused(zoo, extra, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        parse_config(_raw(zoo, **extra))


def test_token_source_must_be_an_input(zoo):
    root, a, b, c = zoo
    with pytest.raises(ConfigError, match="is not one of the merge's models"):
        parse_config(_raw(zoo, tokenizer={"tokens": {"<t>": {"source": c}}}))


def test_token_without_a_source_missing_somewhere_is_refused(zoo, tmp_path):
    with pytest.raises(MergeError, match=r"tokenizer.tokens\['sat'\]: has no source"):
        fx_merge(_raw(zoo, tokenizer={"source": "union", "tokens": {"sat": {}}}), tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("method", ["passthrough", "slerp"])
def test_slices_with_a_union_tokenizer_bitwise_mergekit(zoo, tmp_path, method):
    """Sliced merges re-index the first slice's embeddings and the last
    slice's lm_head over that slice's sources (a token none of them has:
    zeros, as mergekit)."""
    root, a, b, c = zoo
    if method == "passthrough":
        # base_model names the tokenizer's base (without one mergekit takes a set's first model)
        raw = {"merge_method": method, "base_model": a,
               "slices": [{"sources": [{"model": b, "layer_range": [0, 1]}]},
                          {"sources": [{"model": a, "layer_range": [0, 1]}]}]}
    else:
        raw = {"merge_method": method, "base_model": a, "parameters": {"t": [0.2, 0.7]},
               "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}, {"model": c, "layer_range": [0, 1]}]},
                          {"sources": [{"model": c, "layer_range": [0, 1]}, {"model": a, "layer_range": [0, 1]}]}]}
    raw.update(tokenizer={"source": "union", "pad_to_multiple_of": 4}, dtype="float32")
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    assert_same_output(tmp_path / "fx", tmp_path / "mk")
    assert config(tmp_path / "fx")["num_hidden_layers"] == 2


def test_base_without_a_fast_tokenizer_is_refused(zoo, tmp_path):
    root, a, b, c = zoo
    slow = str(tmp_path / "slow")
    synthetic.make_llama(slow, hidden=HIDDEN, layers=1, vocab=7, dtype=torch.float32)
    with open(os.path.join(slow, "tokenizer.model"), "wb") as f:
        f.write(b"\0")
    raw = {"merge_method": "linear", "base_model": slow, "tokenizer_source": "union",
           "models": [{"model": slow, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeError, match="has tokenizer.model but no tokenizer.json"):
        fx_merge(raw, tmp_path / "o")
    os.remove(os.path.join(slow, "tokenizer.model"))
    with pytest.raises(MergeError, match="has no tokenizer.json; a tokenizer merge needs the base model's"):
        fx_merge(raw, tmp_path / "o")


def test_chat_template_auto_takes_the_models_most_common(zoo, tmp_path):
    """``auto``: the template most input tokenizers carry, as mergekit picks it."""
    root, a, b, c = zoo
    t1 = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    t2 = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    folders = []
    for i, t in enumerate((t1, t2, t2)):
        ft = str(synthetic.fine_tune(a, tmp_path / f"ft{i}", seed=10 + i))
        with open(os.path.join(ft, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        cfg["chat_template"] = t
        with open(os.path.join(ft, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
        folders.append(ft)
    raw = {"merge_method": "linear", "chat_template": "auto",
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in folders]}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk", copy_tokenizer=True)
    for folder in ("fx", "mk"):
        with open(tmp_path / folder / "chat_template.jinja") as f:
            assert f.read() == t2, folder


def test_padded_embeddings_and_the_cli(zoo, tmp_path):
    """A model whose embeddings have more rows than its tokenizer has tokens
    (config vocab_size 12 for 7 tokens), merged through ``ferrox merge``."""
    from ferrox.cli import main

    root, a, b, c = zoo
    d = str(tmp_path / "d")
    synthetic.make_llama(d, hidden=HIDDEN, layers=1, vocab=12, dtype=torch.float32, seed=7)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(c, name)) as src, open(os.path.join(d, name), "w") as dst:
            dst.write(src.read())
    raw = {"merge_method": "linear", "base_model": a, "tokenizer_source": "union", "dtype": "float32",
           "models": [{"model": a, "parameters": {"weight": 0.25}}, {"model": d, "parameters": {"weight": 0.75}}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "fx"), "--no-progress"]) == 0
    run_mergekit(raw, tmp_path / "mk")
    assert_same_output(tmp_path / "fx", tmp_path / "mk", dense=(a, d), spec=parse_config(raw).tokenizer)
    assert config(tmp_path / "fx")["vocab_size"] == 8


def make_bpe(folder, text, extra=(), rows=None, seed=0):
    """A BPE tokenizer trained on ``text``; ``extra`` added tokens get ids past
    the embedding rows (``rows``, default: the trained vocabulary's size)."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>"],
                                                      show_progress=False))
    n = tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens(list(extra))
    synthetic.make_llama(folder, hidden=HIDDEN, layers=1, vocab=rows or n, dtype=torch.float32, seed=seed)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return str(folder), n


def test_base_tokens_past_vocab_size_are_stripped_as_mergekit(tmp_path):
    """A base tokenizer with added tokens past its embedding rows: mergekit
    strips them (BPE); the output vocabulary and rows are its, bit for bit."""
    a, n = make_bpe(tmp_path / "a", ["the cat sat on the mat", "a cat and a hat"], extra=["<e1>", "<e2>"])
    b, _ = make_bpe(tmp_path / "b", ["the dog ran to the log", "a dog"], seed=1)
    raw = {"merge_method": "linear", "base_model": a, "tokenizer_source": "base", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b)]}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    assert_same_output(tmp_path / "fx", tmp_path / "mk")
    assert len(vocab(tmp_path / "fx")) == n and "<e1>" not in vocab(tmp_path / "fx")


def test_a_base_that_cannot_be_stripped_is_refused(tmp_path):
    """Stripping trained tokens leaves merges that make them (mergekit fails
    there too); ferrox says which tokenizer and why."""
    a, n = make_bpe(tmp_path / "a", ["the cat sat on the mat", "a cat and a hat"])
    a, _ = make_bpe(tmp_path / "a", ["the cat sat on the mat", "a cat and a hat"], rows=n - 3)
    raw = {"merge_method": "linear", "base_model": a, "tokenizer_source": "base",
           "models": [{"model": a, "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeError, match=f"its tokenizer stripped to vocab_size {n - 3} is not valid"):
        fx_merge(raw, tmp_path / "o")


@pytest.mark.gpu
def test_tokenizer_merge_on_cuda_is_the_cpu_merge(zoo, tmp_path):
    root, a, b, c = zoo
    raw = {"merge_method": "ties", "base_model": a, "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
           "models": [{"model": m, "parameters": {"weight": 0.6, "density": 0.5}} for m in (b, c)]}
    merge_checkpoints(parse_config(raw), str(tmp_path / "cpu"), progress=False)
    merge_checkpoints(parse_config(raw), str(tmp_path / "gpu"), progress=False, device="cuda")
    x, y = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    assert vocab(tmp_path / "cpu") == vocab(tmp_path / "gpu")
    for name in x:
        assert torch.equal(x[name], y[name]), name


def test_union_with_a_lora_input_bitwise_mergekit(zoo, tmp_path):
    """A model+lora input whose adapter changes the embeddings: the adapter
    is applied first, then the rows are re-indexed (as mergekit, which merges
    the adapter before anything else); the resolved config parses back."""
    from ferrox.extract.lora import extract_lora

    root, a, b, c = zoo
    ft = str(synthetic.fine_tune(b, tmp_path / "ftb", seed=21, scale=0.2))
    ad = str(tmp_path / "ad")
    extract_lora(b, ft, 2, ad, select=["*proj*", "*embed_tokens*"], progress=False)
    assert any("lora_embedding_A" in k for k in load_file(os.path.join(ad, "adapter_model.safetensors")))
    raw = {"merge_method": "linear", "base_model": a, "dtype": "float32",
           "tokenizer": {"source": "union", "tokens": {"<t>": {"source": {"kind": "model_token", "model": f"{b}+{ad}",
                                                                   "token": "dog"}}}},
           "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": f"{b}+{ad}", "parameters": {"weight": 0.5}}]}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk", lora_merge_cache=str(tmp_path / "cache"))
    assert_same_output(tmp_path / "fx", tmp_path / "mk")
    with open(tmp_path / "fx" / "ferrox_config.yml") as f:
        again = parse_config(yaml.safe_load(f))
    assert again.tokenizer == parse_config(raw).tokenizer
