"""Tokenisation with Hugging Face ``tokenizers``: a WordLevel vocabulary from train only.

Lower-cased, accents stripped, split on whitespace and punctuation; ``[PAD]`` is id 0
and ``[UNK]`` id 1. The vocabulary holds the ``vocab_size`` most frequent words of the
training texts (words seen once are left out), so validation and test words outside it
map to ``[UNK]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A WordLevel tokenizer trained on ``texts`` (the training split only)."""
    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(
    tokenizer: Tokenizer, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, max_len], lengths [N])``: truncated, right-padded with ``[PAD]``.

    Empty texts get length 1 (one ``[PAD]``), so packed LSTMs accept every row.
    """
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=max_len)
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), max_len)
    lengths = np.array([sum(e.attention_mask) for e in encodings], dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(np.maximum(lengths, 1))
