"""One-off CPU timing: cached greedy generation (moa_train.generation._generate_ids) with each
decode step attending over the live context (span, as moa-generate does) against the whole cache.

    python3 docs/results/runs/inference/cpu_generate_spans.py
"""

import time

import torch
from omegaconf import OmegaConf

from moa_train import config
from moa_train.generation import _generate_ids
from moa_train.models.lm import LanguageModel


def greedy(logits):
    return logits.argmax(-1)


def whole_cache(self, tokens, cache, span=None, decode_step=LanguageModel.decode_step):
    return decode_step(self, tokens, cache)  # span dropped: every step reads all max_len positions


torch.set_num_threads(2)
for name in ("mha", "moas_dynamic"):
    m = OmegaConf.structured(
        config.VARIANTS[name](
            name=name, d_model=256, n_layer=4, n_head=8, max_seq_len=1024, dropout=0.0
        )
    )
    torch.manual_seed(0)
    lm = LanguageModel(m, 8192).eval()
    prompts = [[1] * 16] * 8
    res = {}
    for label in ("span", "whole"):
        original = LanguageModel.decode_step
        if label == "whole":
            LanguageModel.decode_step = whole_cache
        with torch.no_grad():
            _generate_ids(lm, prompts, 8, True, greedy)  # warm-up
            t0 = time.perf_counter()
            out = _generate_ids(lm, prompts, 600, True, greedy)
            res[label] = (time.perf_counter() - t0, out)
        LanguageModel.decode_step = original
    print(
        name,
        {k: round(v[0], 2) for k, v in res.items()},
        "same tokens:",
        res["span"][1] == res["whole"][1],
    )
