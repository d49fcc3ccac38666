"""Token streams, what every LM data source gives a task (a text corpus, random tokens): the splits'
ids with the characters and words of the text behind them, so a loss in nats per token converts to
bits per character (`val/bpc`) and word-level perplexity (`val/word_ppl`) whatever the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moa_train.data.corpus import DataError


@dataclass
class Split:
    tokens: np.ndarray  # 1-D memmap of token ids
    n_chars: int  # characters of the underlying text
    n_words: int  # whitespace words + one <eos> per line (the WikiText word count)
    source: str = ""  # where the text comes from (a file, or a part of one), for error messages

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / max(len(self.tokens), 1)

    @property
    def words_per_token(self) -> float:
        return self.n_words / max(len(self.tokens), 1)


@dataclass
class TokenData:
    splits: dict  # "train" | "val" | "test" -> Split
    vocab_size: int
    tokenizer: str
    # tokenizer_json's file, which a run copies into its folder; None: no text
    tokenizer_file: Path | None = None


def check_lengths(data: TokenData, block_size: int) -> None:
    """Every split must hold a window of block_size tokens and its next-token targets. Checked
    before the first step: a short valid/test split otherwise surfaces at the first evaluation,
    after training steps and before any checkpoint."""
    for name, split in data.splits.items():
        n = len(split.tokens)
        if n < block_size + 2:
            raise DataError(
                f"data file {split.source or name}: the {name} split holds {n} tokens, too few for "
                f"trainer.block_size={block_size} (needs block_size + 2); valid here: "
                f"1..{max(n - 2, 0)}, or a longer file"
            )


def word_count(text: str) -> int:
    return len(text.split()) + text.count("\n")
