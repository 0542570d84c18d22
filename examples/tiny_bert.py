"""A tiny BERT-style encoder and an offline WordPiece tokenizer, for text-model tests.

Nothing is downloaded: the model is randomly initialised with a fixed seed and the
vocabulary is built from the standard library's docstrings.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NUM_WORDS = 2000
SEQ_LEN = 16
HIDDEN = 64
_WORD = re.compile(r"\w+|[^\w\s]")  # roughly BERT's basic tokenizer: words and punctuation


class EncoderWrapper(nn.Module):
    """forward(input_ids, attention_mask) -> last_hidden_state: one tensor in, one out,
    so ONNX export, tracing and output metrics need no dict handling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build_vocab(texts: list[str], num_words: int = NUM_WORDS) -> list[str]:
    """Special tokens, every character (plain and as a ##suffix), then the most frequent words."""
    words = Counter(w for t in texts for w in _WORD.findall(t.lower()))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    known = set(vocab)
    frequent = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab += [w for w, _ in frequent if w not in known][:num_words]
    return vocab


def build_tokenizer(directory: str | Path, num_words: int = NUM_WORDS):
    """Write vocab.txt plus tokenizer files to directory and return the tokenizer.

    The directory loads later with `transformers.AutoTokenizer.from_pretrained(directory)`.
    """
    from transformers import BertTokenizerFast

    from deploy.examples.docstring_corpus import docstring_corpus

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(docstring_corpus(), num_words)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained on the folder (not vocab_file=...) works in transformers 4 and 5 alike.
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), model_max_length=128)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_bert(seed: int = 0, vocab_size: int | None = None, layers: int = 2) -> EncoderWrapper:
    """A `layers`-layer (default 2), 64-wide BERT encoder with fixed random weights, in eval mode.

    vocab_size defaults to the size of build_tokenizer's vocabulary.
    """
    from transformers import BertConfig, BertModel

    if vocab_size is None:
        from deploy.examples.docstring_corpus import docstring_corpus

        vocab_size = len(build_vocab(docstring_corpus()))
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
        attn_implementation="eager",  # sdpa/flash paths trip up export and tracing
    )
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    return EncoderWrapper(model).eval()


def example_inputs(batch: int = 1, seq_len: int = SEQ_LEN, seed: int = 0):
    """(input_ids, attention_mask), int64 of shape (batch, seq_len), for export and tests."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(SPECIAL_TOKENS), 1000, (batch, seq_len), generator=gen)
    return input_ids, torch.ones(batch, seq_len, dtype=torch.int64)
