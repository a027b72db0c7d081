"""Language-model building blocks: offline corpora, tokenizer, next-token sequences and their
token-prefix α-subsets (kdsweep.data.text), the causal GPT (kdsweep.models.sequence), perplexity."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from kdsweep.config import DataParams
from kdsweep.data import text
from kdsweep.data.prepared import load_prepared, subset_size, write_prepared
from kdsweep.metrics import evaluate
from kdsweep.models import build_model
from kdsweep.models.sequence import GPT

SEQ_LEN = 16


@pytest.fixture(scope="module")
def pydoc_docs() -> list[str]:
    return text._pydoc_documents()[:20]


@pytest.fixture(scope="module")
def tok(pydoc_docs: list[str]) -> Tokenizer:
    return text.train_tokenizer(pydoc_docs, vocab_size=300)


def test_pydoc_corpus_is_nonempty_and_deterministic() -> None:
    docs = text._pydoc_documents()
    assert len(docs) > 10 and all(isinstance(d, str) and d for d in docs)
    assert docs == text._pydoc_documents()


def test_stdlib_corpus_is_every_top_level_module_in_order() -> None:
    docs = text._stdlib_documents()
    assert len(docs) > 100 and sum(map(len, docs)) > 5 * sum(map(len, text._pydoc_documents()))
    assert docs == text._stdlib_documents()
    assert Path(functools.__file__).read_text(encoding="utf-8") in docs


def test_textfile_corpus_splits_on_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird doc\n")
    assert text._textfile_documents(str(f)) == ["first doc\nstill first", "second doc", "third doc"]
    with pytest.raises(text.CorpusError, match="path"):
        text._textfile_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(text.CorpusError, match="path"):
        text.textfile(DataParams(name="textfile"))  # no data.path


def test_unknown_corpus_names_the_registered_ones() -> None:
    with pytest.raises(ValidationError, match="pydoc, stdlib, textfile, hf"):
        DataParams(name="wiki")


def test_hf_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(text.CorpusError, match="pip install datasets"):
        text.hf(DataParams(name="hf", hf_name="wikitext"))
    with pytest.raises(text.CorpusError, match="hf_name"):
        text.hf(DataParams(name="hf"))


def test_split_documents_disjoint_and_deterministic() -> None:
    docs = [f"doc {i}" for i in range(50)]
    train, test = text.split_documents(docs, test_fraction=0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(docs)
    assert (train, test) == text.split_documents(docs, test_fraction=0.2, seed=3)
    assert (train, test) != text.split_documents(docs, test_fraction=0.2, seed=4)
    assert train != sorted(train, key=lambda d: int(d.split()[1]))  # order shuffled too
    with pytest.raises(text.CorpusError, match="at least 2 documents"):
        text.split_documents(["alone"], 0.5, 0)


def test_tokenizer_round_trips_and_serialises(tok: Tokenizer, pydoc_docs: list[str]) -> None:
    assert tok.get_vocab_size() == 300
    sentence = "The with statement wraps a block — naïvely, 42 times!"
    ids = tok.encode(sentence).ids
    assert tok.decode(ids) == sentence
    again = Tokenizer.from_str(tok.to_str())  # what prepare writes to tokenizer.json
    assert again.encode(sentence).ids == ids
    assert again.to_str() == tok.to_str()
    retrained = text.train_tokenizer(pydoc_docs, vocab_size=300)
    assert retrained.to_str() == tok.to_str()  # deterministic
    assert tok.token_to_id(text.EOT) is not None
    with pytest.raises(text.CorpusError, match="vocab_size must be at least 257"):
        text.train_tokenizer(pydoc_docs, vocab_size=200)


def test_encode_sequences_shapes_and_shift(tok: Tokenizer, pydoc_docs: list[str]) -> None:
    x, y = text.encode_sequences(tok, pydoc_docs, SEQ_LEN)
    assert x.shape == y.shape and x.shape[1] == SEQ_LEN and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    eot = tok.token_to_id(text.EOT)
    stream = [i for d in pydoc_docs for i in [*tok.encode(d).ids, eot]]
    windows = torch.cat([x, y[:, -1:]], dim=1)  # non-overlapping, seq_len + 1 tokens each
    assert len(x) == len(stream) // (SEQ_LEN + 1)
    assert windows.reshape(-1).tolist() == stream[: windows.numel()]
    with pytest.raises(text.CorpusError, match="too few for one sequence"):
        text.encode_sequences(tok, ["hi"], SEQ_LEN)


def test_token_prefix_subsets_are_nested(
    tok: Tokenizer, pydoc_docs: list[str], tmp_path: Path
) -> None:
    """Fewer documents give a prefix of the sequences; prepared LM subsets are stream prefixes,
    the same for every subset seed."""
    x, y = text.encode_sequences(tok, pydoc_docs, SEQ_LEN)
    xk, yk = text.encode_sequences(tok, pydoc_docs[:7], SEQ_LEN)
    assert 0 < len(xk) < len(x)
    assert torch.equal(xk, x[: len(xk)]) and torch.equal(yk, y[: len(yk)])
    p = DataParams(name="pydoc", n_train=40, n_test=8, vocab_size=300, seq_len=SEQ_LEN)
    splits = text.corpus_splits(p, pydoc_docs)
    write_prepared(tmp_path, splits, [0, 1])
    prep = load_prepared(tmp_path)
    assert prep.splits.tokenizer_json == splits.tokenizer_json
    assert Tokenizer.from_str(prep.splits.tokenizer_json).get_vocab_size() == splits.num_classes
    n = len(splits.y_train)
    subsets = [prep.subset(a, 0) for a in (0.1, 0.25, 0.5, 1.0)]
    for a, idx in zip((0.1, 0.25, 0.5, 1.0), subsets, strict=True):
        assert torch.equal(idx, torch.arange(subset_size(a, n)))  # contiguous prefixes
        assert torch.equal(prep.subset(a, 1), idx)


def test_corpus_splits_cap_sizes_and_keep_documents_apart(pydoc_docs: list[str]) -> None:
    p = DataParams(name="pydoc", n_train=10, n_test=3, vocab_size=300, seq_len=SEQ_LEN)
    s = text.corpus_splits(p, pydoc_docs)
    assert s.x_train.shape == (10, SEQ_LEN) and s.x_test.shape == (3, SEQ_LEN)
    assert s.num_classes == 300 and s.name == "pydoc" and s.tokenizer_json
    with pytest.raises(text.CorpusError, match="no documents"):
        text.corpus_splits(p, [])
    train, test = text.split_documents(pydoc_docs, p.test_fraction, p.seed)
    tok = Tokenizer.from_str(s.tokenizer_json)
    assert tok.to_str() == text.train_tokenizer(train, p.vocab_size).to_str()  # train docs only
    xt, _ = text.encode_sequences(tok, test, SEQ_LEN)
    assert torch.equal(s.x_test, xt[:3])


# ---------------------------------------------------------------------------------------------
# The GPT (kdsweep.models.sequence)


def _gpt(arch: str, vocab: int, width: int) -> GPT:
    model = build_model(arch, (SEQ_LEN,), vocab, width)
    assert isinstance(model, GPT)
    return model


def test_causal_masking() -> None:
    torch.manual_seed(0)
    vocab = 50
    model = _gpt("gpt", vocab, width=32).eval()
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
    model = _gpt("gpt-small", 40, width=16)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 40
    assert len(model.blocks) == 4 and len(_gpt("gpt", 40, 16).blocks) == 2
    assert model.head.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # untied
    x = torch.randint(0, 40, (2, SEQ_LEN))
    logits = model(x)
    assert logits.shape == (2, SEQ_LEN, 40)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x.reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model(x[:, :5]).shape == (2, 5, 40)  # shorter inputs are fine
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, SEQ_LEN + 1, dtype=torch.int64))


def test_gpt_width_must_split_into_heads() -> None:
    from kdsweep.errors import KdsweepError

    with pytest.raises(KdsweepError, match="arch gpt: width 18 must be divisible by heads 4"):
        build_model("gpt", (SEQ_LEN,), 40, 18)
    with pytest.raises(KdsweepError, match="rank 1"):
        build_model("gpt", (1, SEQ_LEN), 40, 16)


def test_perplexity_of_uniform_logits_is_vocab_size() -> None:
    vocab = 37
    y = torch.randint(0, vocab, (4, SEQ_LEN))
    assert evaluate(torch.zeros(4, SEQ_LEN, vocab), y)["test_ppl"] == pytest.approx(vocab)
    confident = torch.nn.functional.one_hot(y, vocab).float() * 100
    assert evaluate(confident, y)["test_ppl"] == pytest.approx(1.0)
    assert evaluate(confident, y)["test_acc"] == 1.0
    assert math.isfinite(evaluate(torch.randn(4, SEQ_LEN, vocab), y)["test_ppl"])
