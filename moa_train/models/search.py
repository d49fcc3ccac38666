"""Greedy and beam search for an encoder-decoder: `model.encode(src, src_mask) -> memory` and
`model.decode(tgt_in, memory, src_mask, last_only=True) -> logits` (B, 1, V) of the last target position (logits
for every position, (B, T, V), are accepted too: search reads position -1).

There is no KV cache: every step re-runs the decoder over the whole prefix (O(T^2), fine at our sizes). Each step
is one decoder call for the whole batch (and, in beam search, all its beams); Python only does the bookkeeping of
finished hypotheses. Call `model.eval()` first: dropout would make the search random.

Beam search follows fairseq's SequenceGenerator: beams are flattened into the batch, each step ranks the top
2 x beam continuations of a sentence's beams, an EOS among the best `beam` of them finishes a hypothesis with
score sum_logprob / len ** lenpen (len counts the EOS), the best `beam` non-EOS continuations go on, and a sentence
is done once it holds `beam` finished hypotheses. Like fairseq (and unlike an optimistic bound on the live beams)
this keeps beam=1 identical to greedy search.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def max_output_len(src_mask: Tensor, a: float = 1.2, b: int = 10) -> int:
    """fairseq's max_len_a * src_len + max_len_b, src_len being the longest real source in the batch (so padding
    does not change it)."""
    return int(a * src_mask.sum(dim=1).max().item() + b)


def next_log_probs(model, tokens: Tensor, memory: Tensor, src_mask: Tensor, banned: list) -> Tensor:
    """Float32 log-probabilities of the token after each prefix (N, V). Banned tokens (BOS, PAD) get -inf without
    renormalising, so a hypothesis' score stays its log-probability under the model."""
    logits = model.decode(tokens, memory, src_mask, last_only=True)[:, -1]  # the output layer on one position
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[:, banned] = float("-inf")
    return logp


def strip(ids: list, stop: tuple) -> list:
    """The ids before the first stop token (EOS, or the PAD that follows it)."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


@torch.no_grad()
def greedy_search(model, src: Tensor, src_mask: Tensor, bos_id: int, eos_id: int, pad_id: int,
                  max_len: int) -> list[list[int]]:
    """The most likely next token at each step, at most `max_len` tokens; ids without BOS and EOS."""
    memory = model.encode(src, src_mask)
    tokens = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    alive = torch.ones(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        nxt = next_log_probs(model, tokens, memory, src_mask, [bos_id, pad_id]).argmax(dim=-1)
        nxt = nxt.masked_fill(~alive, pad_id)  # finished sentences only pad, to keep one rectangular tensor
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        alive &= nxt != eos_id
        if not alive.any():
            break
    return [strip(row, (eos_id, pad_id)) for row in tokens[:, 1:].tolist()]


def finish_eos(finished: list, tokens: Tensor, cand_scores: Tensor, cand_beams: Tensor, cand_tokens: Tensor,
               eos_id: int, beam: int, lenpen: float) -> None:
    """Move each EOS among a sentence's best `beam` candidates into `finished[b]` (a list of (score, ids)), until
    it holds `beam`. -inf candidates (only there while fewer live continuations exist than asked for) are skipped."""
    top = slice(0, beam)
    hits = (cand_tokens[:, top] == eos_id) & cand_scores[:, top].isfinite()
    length = tokens.shape[1]  # the prefix without its BOS, plus the EOS
    for b, j in hits.nonzero().tolist():
        if len(finished[b]) < beam:
            ids = tokens[b * beam + cand_beams[b, j], 1:].tolist()
            finished[b].append((cand_scores[b, j].item() / length ** lenpen, ids))


def finish_live(finished: list, tokens: Tensor, scores: Tensor, beam: int, lenpen: float) -> None:
    """At max_len, the live beams of unfinished sentences join their finished ones as if EOS came next."""
    length = tokens.shape[1]  # max_len tokens + the virtual EOS
    for b, f in enumerate(finished):
        if len(f) < beam:
            f.extend((s / length ** lenpen, tokens[b * beam + j, 1:].tolist())
                     for j, s in enumerate(scores[b].tolist()) if s != float("-inf"))


@torch.no_grad()
def beam_search(model, src: Tensor, src_mask: Tensor, bos_id: int, eos_id: int, pad_id: int, max_len: int,
                beam: int = 4, lenpen: float = 0.6) -> list[list[int]]:
    """Best hypothesis per sentence by sum_logprob / len ** lenpen (len counts the EOS), at most `max_len` tokens;
    ids without BOS and EOS. Beams still live at `max_len` are scored as if EOS came next (length max_len + 1,
    no EOS log-probability: the model is not asked)."""
    bsz = src.shape[0]
    memory = model.encode(src, src_mask).repeat_interleave(beam, dim=0)
    mask = src_mask.repeat_interleave(beam, dim=0)
    tokens = torch.full((bsz * beam, 1), bos_id, dtype=torch.long, device=src.device)
    # all beams start equal: only beam 0 may expand at the first step, or the top-k would hold `beam` copies
    scores = torch.full((bsz, beam), float("-inf"), device=src.device)
    scores[:, 0] = 0.0
    finished = [[] for _ in range(bsz)]
    offsets = torch.arange(bsz, device=src.device)[:, None] * beam
    for _ in range(max_len):
        logp = next_log_probs(model, tokens, memory, mask, [bos_id, pad_id])
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(bsz, beam * vocab)
        cand_scores, cand_idx = cand.topk(min(2 * beam, beam * vocab), dim=1)
        cand_beams, cand_tokens = cand_idx // vocab, cand_idx % vocab
        finish_eos(finished, tokens, cand_scores, cand_beams, cand_tokens, eos_id, beam, lenpen)
        if all(len(f) == beam for f in finished):
            break
        # the best `beam` non-EOS candidates go on: a stable sort moves EOS to the back, keeping score order
        keep = torch.sort((cand_tokens == eos_id).int(), dim=1, stable=True).indices[:, :beam]
        scores = cand_scores.gather(1, keep)
        rows = (offsets + cand_beams.gather(1, keep)).view(-1)
        tokens = torch.cat([tokens[rows], cand_tokens.gather(1, keep).view(-1, 1)], dim=1)
    else:  # max_len reached before every sentence was done
        finish_live(finished, tokens, scores, beam, lenpen)
    return [max(f, key=lambda h: h[0])[1] for f in finished]

