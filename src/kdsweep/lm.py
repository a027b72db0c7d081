"""Language-model building blocks: an offline corpus, a byte-level BPE tokenizer, contiguous
next-token sequences and a small GPT-style decoder.

α-subsets for language models are token-stream prefixes, not class-interleaved permutations:
documents are shuffled once (in `split_documents`), concatenated in order and cut into contiguous
windows, so the first m sequences are the first m·seq_len training tokens and `prefix_order`
makes every α-subset nested by construction.
"""

from __future__ import annotations

import math
import re
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from kdsweep.errors import KdsweepError
from kdsweep.models import Block

EOT = "<|endoftext|>"
SOURCES = ("pydoc", "stdlib", "textfile", "hf")
STDLIB_MAX_FILES = 64
LM_ARCHS: dict[str, tuple[int, int]] = {
    "gpt": (2, 4),
    "gpt-small": (4, 4),
}  # arch -> (depth, heads)


class CorpusError(KdsweepError):
    """A corpus that cannot be loaded or is too small for what was asked."""


def _pydoc_documents() -> list[str]:
    """The topic help texts CPython ships in `pydoc_data`: English prose (~0.5 MB), offline, and
    present in every CPython install, so the default LM corpus needs no download."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _stdlib_documents() -> list[str]:
    """Top-level standard-library modules as code text; capped so tokenising stays quick."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:STDLIB_MAX_FILES]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _textfile_documents(path: str | None) -> list[str]:
    """One plain-text file, documents separated by blank lines: the simplest way to bring own text."""
    if path is None or not Path(path).is_file():
        raise CorpusError(f"source 'textfile' needs path= an existing text file, got {path!r}")
    text = Path(path).read_text(encoding="utf-8")
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


def load_documents(source: str, path: str | None = None, hf_name: str | None = None) -> list[str]:
    """The corpus as a list of documents, in a fixed order (offline unless source is 'hf')."""
    if source == "pydoc":
        docs = _pydoc_documents()
    elif source == "stdlib":
        docs = _stdlib_documents()
    elif source == "textfile":
        docs = _textfile_documents(path)
    elif source == "hf":
        docs = _hf_documents(hf_name)
    else:
        raise CorpusError(f"unknown corpus source {source!r}: allowed are {', '.join(SOURCES)}")
    if not docs:
        raise CorpusError(f"corpus source {source!r} yielded no documents")
    return docs


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


def tokenizer_to_json(tok: Tokenizer) -> str:
    """The tokenizer as JSON text: a plain, inspectable artifact (no pickle)."""
    return tok.to_str()


def tokenizer_from_json(s: str) -> Tokenizer:
    return Tokenizer.from_str(s)


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


def prefix_order(n: int) -> torch.Tensor:
    """The LM subset order: the identity, so the α-subset is the first round(α·N) sequences —
    contiguous documents, nested across α."""
    return torch.arange(n)


class GPT(nn.Module):
    """A small decoder-only transformer. The output layer is `.head` (untied from the token
    embedding) so the `random_head` control can re-initialise it alone; no layer keeps running
    statistics, so students stack under `torch.func.vmap`."""

    def __init__(self, vocab_size: int, seq_len: int, width: int, depth: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads, causal=True) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """GPT-2's small normal init: PyTorch's defaults train a transformer noticeably worse."""
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        if length > self.seq_len:
            raise ValueError(f"input length {length} exceeds the model's seq_len {self.seq_len}")
        h = self.tok_emb(x) + self.pos_emb(torch.arange(length, device=x.device))
        return self.head(self.ln_f(self.blocks(h)))


def build_lm(arch: str, vocab_size: int, seq_len: int, width: int) -> GPT:
    """The LM counterpart of `build_model`: depth and heads come from the arch name."""
    if arch not in LM_ARCHS:
        raise ValueError(f"unknown LM arch {arch!r}: allowed are {', '.join(LM_ARCHS)}")
    depth, heads = LM_ARCHS[arch]
    return GPT(vocab_size, seq_len, width, depth, heads)


def perplexity(logits: torch.Tensor, y: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over every position: the LM test metric."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    return math.exp(ce.item())
