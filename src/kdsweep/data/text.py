"""Text corpora for the language-model track (registered in DATASETS), a byte-level BPE
tokenizer and contiguous next-token sequences.

α-subsets for language models are token-stream prefixes, not class-interleaved permutations:
documents are shuffled once (in `split_documents`), concatenated in order and cut into contiguous
windows, so the first m sequences are the first m·seq_len training tokens and every α-subset is
nested by construction (the prepared subset order is the identity).
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdsweep.config import DataParams
from kdsweep.data.splits import Splits
from kdsweep.errors import KdsweepError

EOT = "<|endoftext|>"


class CorpusError(KdsweepError):
    """A corpus that cannot be loaded or is too small for what was asked."""


def _pydoc_documents() -> list[str]:
    """The topic help texts CPython ships in `pydoc_data`: English prose (~0.5 MB), offline, and
    present in every CPython install, so the default LM corpus needs no download."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _stdlib_documents() -> list[str]:
    """Every top-level module of this interpreter's standard library, one document each, in
    file-name order: ~4.7 MB of Python on CPython 3.11 (~1.7M tokens at a 1024-token vocabulary),
    ten times the pydoc topics, offline. Enough text that a teacher trained on all of it is
    clearly better than students of a fraction; packages and test suites are left out so that
    tokenising stays at seconds."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(root.glob("*.py"))]


def _textfile_documents(path: str | None) -> list[str]:
    """One plain-text file, documents separated by blank lines: the simplest way to bring own text."""
    if path is None or not Path(path).is_file():
        raise CorpusError(f"source 'textfile' needs path= an existing text file, got {path!r}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"data.path={path} is not UTF-8 text ({err.reason} at byte {err.start}): point "
            "data.path at a plain-text file"
        ) from None
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _hf_documents(hf_name: str | None) -> list[str]:
    """A Hugging Face dataset's train split, one document per non-empty `text` row (needs network)."""
    if hf_name is None:
        raise CorpusError("source 'hf' needs hf_name= a Hugging Face dataset name")
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            "source 'hf' needs the `datasets` package: `pip install datasets` "
            "(or use the offline sources 'pydoc', 'stdlib', 'textfile')"
        ) from None
    ds = datasets.load_dataset(hf_name, split="train")
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {hf_name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t.strip()]


def split_documents(
    docs: list[str], test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Train/test split by whole documents, before tokenisation, so no text crosses the split.

    The seeded shuffle also fixes the training order once, so a token-stream prefix (an α-subset)
    is not biased by the corpus's own ordering (e.g. alphabetical topics).
    """
    if not 0.0 < test_fraction < 1.0:
        raise CorpusError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(docs) < 2:
        raise CorpusError(f"need at least 2 documents to split, got {len(docs)}")
    perm = np.random.default_rng(seed).permutation(len(docs))
    n_test = min(max(1, round(test_fraction * len(docs))), len(docs) - 1)
    return [docs[i] for i in perm[n_test:]], [docs[i] for i in perm[:n_test]]


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained offline on `docs`: every byte is in the alphabet, so no text is
    out of vocabulary; `EOT` is reserved as a special token to separate documents."""
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < min_size:
        raise CorpusError(
            f"vocab_size must be at least {min_size} (256 bytes + {EOT}), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_sequences(
    tok: Tokenizer, docs: list[str], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs (x, y), each [N, seq_len] int64, from non-overlapping windows of the stream.

    The stream is each document's tokens followed by `EOT`, documents in order; so the stream of
    docs[:k] is a prefix of the stream of docs, and so are its sequences. A trailing partial
    window is dropped.
    """
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise CorpusError(f"tokenizer has no {EOT} token: train it with `train_tokenizer`")
    stream: list[int] = []
    for enc in tok.encode_batch(docs):
        stream.extend(enc.ids)
        stream.append(eot)
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise CorpusError(
            f"{len(stream)} tokens are too few for one sequence of seq_len={seq_len}: "
            "use more documents or a shorter seq_len"
        )
    windows = torch.tensor(stream[: n * (seq_len + 1)], dtype=torch.int64).view(n, seq_len + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def corpus_splits(p: DataParams, docs: list[str]) -> Splits:
    """Documents split before tokenisation; the BPE tokenizer is trained on the training documents
    only; x/y are next-token windows of `seq_len`, num_classes is the vocabulary size."""
    if not docs:
        raise CorpusError(f"corpus {p.name!r} yielded no documents")
    train_docs, test_docs = split_documents(docs, p.test_fraction, p.seed)
    tok = train_tokenizer(train_docs, p.vocab_size)
    x, y = encode_sequences(tok, train_docs, p.seq_len)
    xt, yt = encode_sequences(tok, test_docs, p.seq_len)
    n, m = min(p.n_train, len(x)), min(p.n_test, len(xt))
    return Splits(x[:n], y[:n], xt[:m], yt[:m], tok.get_vocab_size(), p.name, tok.to_str())


def pydoc(p: DataParams) -> Splits:
    return corpus_splits(p, _pydoc_documents())


def stdlib(p: DataParams) -> Splits:
    return corpus_splits(p, _stdlib_documents())


def textfile(p: DataParams) -> Splits:
    return corpus_splits(p, _textfile_documents(p.path))


def hf(p: DataParams) -> Splits:
    return corpus_splits(p, _hf_documents(p.hf_name))
