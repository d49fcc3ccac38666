"""Uniformly random token ids (nanoGPT's bench.py): speed measurements at any vocabulary without a
tokenizer.

Nothing can be learned from them beyond the unigram entropy log(vocab); they exist for `moa-bench`
and scaling runs.
"""

from __future__ import annotations

import numpy as np

from moa_train.data.tokens import Split, TokenData

SPLIT_TOKENS = {"train": 1 << 22, "val": 1 << 18, "test": 1 << 18}


def load_random_tokens(cfg) -> TokenData:
    """Seeded random splits over data.vocab_size ids."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in SPLIT_TOKENS.items():
        tokens = rng.integers(0, cfg.vocab_size, n, dtype=np.int32)
        splits[name] = Split(tokens, n_chars=n, n_words=n, source=f"random_tokens ({name})")
    return TokenData(splits, cfg.vocab_size, "random")
