"""Language-model building blocks: offline corpus, tokenizer, sequences, causal GPT, perplexity."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from kdsweep import lm

SEQ_LEN = 16


@pytest.fixture(scope="module")
def pydoc_docs() -> list[str]:
    return lm.load_documents("pydoc")[:20]


@pytest.fixture(scope="module")
def tok(pydoc_docs: list[str]):
    return lm.train_tokenizer(pydoc_docs, vocab_size=300)


def test_pydoc_corpus_is_nonempty_and_deterministic() -> None:
    docs = lm.load_documents("pydoc")
    assert len(docs) > 10 and all(isinstance(d, str) and d for d in docs)
    assert docs == lm.load_documents("pydoc")


def test_stdlib_corpus_is_capped_code() -> None:
    docs = lm.load_documents("stdlib")
    assert 0 < len(docs) <= lm.STDLIB_MAX_FILES
    assert any("def " in d for d in docs)


def test_textfile_corpus_splits_on_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird doc\n")
    assert lm.load_documents("textfile", path=str(f)) == [
        "first doc\nstill first",
        "second doc",
        "third doc",
    ]
    with pytest.raises(lm.CorpusError, match="path"):
        lm.load_documents("textfile", path=str(tmp_path / "missing.txt"))


def test_unknown_source_names_allowed_ones() -> None:
    with pytest.raises(ValueError, match="pydoc, stdlib, textfile, hf"):
        lm.load_documents("wiki")


def test_hf_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(lm.CorpusError, match="pip install datasets"):
        lm.load_documents("hf", hf_name="wikitext")


def test_split_documents_disjoint_and_deterministic() -> None:
    docs = [f"doc {i}" for i in range(50)]
    train, test = lm.split_documents(docs, test_fraction=0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(docs)
    assert (train, test) == lm.split_documents(docs, test_fraction=0.2, seed=3)
    assert (train, test) != lm.split_documents(docs, test_fraction=0.2, seed=4)
    assert train != sorted(train, key=lambda d: int(d.split()[1]))  # order shuffled too


def test_tokenizer_round_trips_and_json(tok, pydoc_docs: list[str]) -> None:
    assert tok.get_vocab_size() == 300
    sentence = "The with statement wraps a block — naïvely, 42 times!"
    ids = tok.encode(sentence).ids
    assert tok.decode(ids) == sentence
    again = lm.tokenizer_from_json(lm.tokenizer_to_json(tok))
    assert again.encode(sentence).ids == ids
    assert lm.tokenizer_to_json(again) == lm.tokenizer_to_json(tok)
    retrained = lm.train_tokenizer(pydoc_docs, vocab_size=300)
    assert lm.tokenizer_to_json(retrained) == lm.tokenizer_to_json(tok)  # deterministic
    assert tok.token_to_id(lm.EOT) is not None


def test_encode_sequences_shapes_and_shift(tok, pydoc_docs: list[str]) -> None:
    x, y = lm.encode_sequences(tok, pydoc_docs, SEQ_LEN)
    assert x.shape == y.shape and x.shape[1] == SEQ_LEN and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    eot = tok.token_to_id(lm.EOT)
    stream = [i for d in pydoc_docs for i in [*tok.encode(d).ids, eot]]
    windows = torch.cat([x, y[:, -1:]], dim=1)  # non-overlapping, seq_len + 1 tokens each
    assert len(x) == len(stream) // (SEQ_LEN + 1)
    assert windows.reshape(-1).tolist() == stream[: windows.numel()]


def test_prefix_nesting(tok, pydoc_docs: list[str]) -> None:
    x, y = lm.encode_sequences(tok, pydoc_docs, SEQ_LEN)
    xk, yk = lm.encode_sequences(tok, pydoc_docs[:7], SEQ_LEN)
    assert 0 < len(xk) < len(x)
    assert torch.equal(xk, x[: len(xk)]) and torch.equal(yk, y[: len(yk)])
    order = lm.prefix_order(len(x))
    assert torch.equal(order, torch.arange(len(x)))
    subsets = [order[: max(1, round(a * len(x)))].tolist() for a in (0.1, 0.25, 0.5, 1.0)]
    for small, big in zip(subsets, subsets[1:], strict=False):
        assert big[: len(small)] == small


def test_causal_masking() -> None:
    torch.manual_seed(0)
    vocab = 50
    model = lm.build_lm("gpt", vocab, SEQ_LEN, width=32).eval()
    x = torch.randint(0, vocab, (3, SEQ_LEN))
    with torch.no_grad():
        base = model(x)
        for t in (0, 1, 7, SEQ_LEN - 1):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 1) % vocab
            out = model(x2)
            assert torch.equal(out[:, :t], base[:, :t])
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_gpt_forward_backward_and_head() -> None:
    torch.manual_seed(0)
    model = lm.build_lm("gpt-small", 40, SEQ_LEN, width=16)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 40
    assert len(model.blocks) == 4
    x = torch.randint(0, 40, (2, SEQ_LEN))
    logits = model(x)
    assert logits.shape == (2, SEQ_LEN, 40)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x.reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model(x[:, :5]).shape == (2, 5, 40)  # shorter inputs are fine
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, SEQ_LEN + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="allowed are gpt, gpt-small"):
        lm.build_lm("lstm", 40, SEQ_LEN, 16)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_gpt_stacks_under_vmap() -> None:
    torch.manual_seed(0)
    models = [lm.build_lm("gpt", 30, SEQ_LEN, width=16) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randint(0, 30, (2, SEQ_LEN))
    call = lambda p, b: functional_call(models[0], (p, b), (x,))  # noqa: E731
    out = vmap(call)(params, buffers)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-4, atol=1e-5)


def test_perplexity_of_uniform_logits_is_vocab_size() -> None:
    vocab = 37
    y = torch.randint(0, vocab, (4, SEQ_LEN))
    assert lm.perplexity(torch.zeros(4, SEQ_LEN, vocab), y) == pytest.approx(vocab)
    confident = torch.nn.functional.one_hot(y, vocab).float() * 100
    assert lm.perplexity(confident, y) == pytest.approx(1.0)
    assert math.isfinite(lm.perplexity(torch.randn(4, SEQ_LEN, vocab), y))
