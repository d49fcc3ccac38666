"""Greedy and beam search for an encoder-decoder, both through `search` (beam=None: greedy):
`model.encode(src, src_mask) -> memory`, then one decoder call per step for the whole batch (and,
in beam search, all its beams); Python only does the bookkeeping of finished hypotheses. Call
`model.eval()` first: dropout would make the search random.

Each step goes through the one stepping strategy (models/decoding.py): either (`use_cache=True`,
the default where every decoder attention can cache) only the newest token through the decoder's
caches, the cross-attention K/V of the source computed at the first step (`Seq2Seq.init_cache` /
`decode_step`), or (`use_cache=False`, and for other models) `model.decode(prefix, memory,
src_mask, last_only=True)` over the whole prefix. Hypotheses that are
done leave the batch (their rows of the cache, memory and mask are dropped), and beam reordering
gathers the cache rows of the surviving beams. Both ways give the same hypotheses (in fp32; the
tests compare them for every variant).

Beam search follows fairseq's SequenceGenerator: beams are flattened into the batch, each step ranks
the top 2 x beam continuations of a sentence's beams, an EOS among the best `beam` of them finishes
a hypothesis with score sum_logprob / len ** lenpen (len counts the EOS), the best `beam` non-EOS
continuations go on, and a sentence is done once it holds `beam` finished hypotheses. Like fairseq
(and unlike an optimistic bound on the live beams) this keeps beam=1 identical to greedy search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moa_train.models.decoding import open_steps
from moa_train.models.kv_cache import without_cudnn_attention


def max_output_len(src_mask: Tensor, a: float = 1.2, b: int = 10) -> int:
    """fairseq's max_len_a * src_len + max_len_b, src_len being the longest real source in the batch
    (so padding does not change it)."""
    return int(a * src_mask.sum(dim=1).max().item() + b)


def open_search(model, memory: Tensor, src_mask: Tensor, max_len: int, use_cache: bool):
    """The decoding strategy of a search over up to `max_len` tokens after BOS
    (models/decoding.py)."""
    return open_steps(
        model,
        memory.shape[0],
        max_len + 1,
        memory.device,
        use_cache=use_cache,
        memory=memory,
        src_mask=src_mask,
    )


def next_log_probs(
    steps, tokens: Tensor, banned: list, eos_id: int = -1, rule: str | None = None
) -> Tensor:
    """Float32 log-probabilities of the token after each prefix (N, V), its newest token stepped
    through `steps`. Banned tokens (BOS, PAD) get -inf without renormalising, so a hypothesis'
    score stays its log-probability under the model. `rule` (length_rule's): "no_eos" bans EOS
    too, "only_eos" bans every token but EOS."""
    logp = F.log_softmax(steps.step(tokens[:, -1]).float(), dim=-1)
    logp[:, banned] = float("-inf")
    if rule == "no_eos":
        logp[:, eos_id] = float("-inf")
    elif rule == "only_eos":
        eos = logp[:, eos_id].clone()
        logp.fill_(float("-inf"))
        logp[:, eos_id] = eos
    return logp


def length_rule(step: int, min_len: int, max_len: int, force_eos: bool) -> str | None:
    """fairseq's SequenceGenerator rules at output position `step` (0-based): EOS refused before
    min_len tokens, only EOS at the limit (with force_eos)."""
    if force_eos and step == max_len:
        return "only_eos"
    return "no_eos" if step < min_len else None


def strip(ids: list, stop: tuple) -> list:
    """The ids before the first stop token (EOS, or the PAD that follows it)."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


@dataclass(frozen=True)
class _Rules:
    """What both algorithms are told: the special ids, the length limits and the stepping."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_len: int
    use_cache: bool
    min_len: int
    force_eos: bool
    start_id: int  # the decoder's first input

    def length_rule(self, step: int) -> str | None:
        return length_rule(step, self.min_len, self.max_len, self.force_eos)

    def next_log_probs(self, steps, tokens: Tensor, rule: str | None) -> Tensor:
        return next_log_probs(steps, tokens, [self.bos_id, self.pad_id], self.eos_id, rule)


@torch.no_grad()
@without_cudnn_attention
def search(
    model,
    src: Tensor,
    src_mask: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int,
    beam: int | None = None,  # None: greedy search; n: beam search with n beams
    lenpen: float = 0.6,
    use_cache: bool = True,
    min_len: int = 0,
    force_eos: bool = False,
    start_id: int | None = None,
) -> list[list[int]]:
    """Hypotheses of at most `max_len` tokens, ids without BOS and EOS: greedy with `beam=None`,
    else beam search with `beam` beams and length penalty `lenpen` (beam=1 runs the beam algorithm,
    which gives greedy's hypotheses). `min_len`: EOS refused before that many tokens; `force_eos`:
    EOS after `max_len` tokens; `start_id`: the decoder's first input (null: BOS; fairseq's:
    EOS)."""
    start = bos_id if start_id is None else start_id
    rules = _Rules(bos_id, eos_id, pad_id, max_len, use_cache, min_len, force_eos, start)
    if beam is None:
        return _greedy(model, src, src_mask, rules)
    return _beam(model, src, src_mask, rules, beam, lenpen)


def greedy_search(*args, **kwargs) -> list[list[int]]:
    """`search` with beam=None (the settings after `max_len` by keyword)."""
    return search(*args, beam=None, **kwargs)


def beam_search(*args, beam: int = 4, **kwargs) -> list[list[int]]:
    """`search` with `beam` beams, 4 unless given (the settings after `max_len` by keyword)."""
    return search(*args, beam=beam, **kwargs)


def _greedy(model, src: Tensor, src_mask: Tensor, rules: _Rules) -> list[list[int]]:
    """The most likely next token at each step; a sentence leaves the batch at its EOS (with
    `force_eos`, after `max_len` tokens: the same ids)."""
    memory = model.encode(src, src_mask)
    with open_search(model, memory, src_mask, rules.max_len, rules.use_cache) as steps:
        tokens = torch.full((src.shape[0], 1), rules.start_id, dtype=torch.long, device=src.device)
        live = list(range(src.shape[0]))  # the sentence of each row
        out: list = [None] * src.shape[0]
        for step in range(rules.max_len + rules.force_eos):
            rule = rules.length_rule(step)
            nxt = rules.next_log_probs(steps, tokens, rule).argmax(dim=-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = (nxt == rules.eos_id).tolist()
            if any(done):
                for row in (i for i, d in enumerate(done) if d):
                    out[live[row]] = tokens[row, 1:-1].tolist()
                stay = [i for i, d in enumerate(done) if not d]
                if not stay:
                    break
                rows = torch.tensor(stay, device=src.device)
                tokens, live = tokens.index_select(0, rows), [live[i] for i in stay]
                steps.select(rows)
        else:
            for row, sentence in enumerate(live):
                out[sentence] = tokens[row, 1:].tolist()
        return out


def finish_eos(
    finished: list,
    tokens: Tensor,
    cand_scores: Tensor,
    cand_beams: Tensor,
    cand_tokens: Tensor,
    eos_id: int,
    beam: int,
    lenpen: float,
) -> None:
    """Move each EOS among a sentence's best `beam` candidates into `finished[b]` (a list of (score,
    ids)), until it holds `beam`. -inf candidates (only there while fewer live continuations exist
    than asked for) are skipped."""
    top = slice(0, beam)
    hits = (cand_tokens[:, top] == eos_id) & cand_scores[:, top].isfinite()
    length = tokens.shape[1]  # the prefix without its BOS, plus the EOS
    for b, j in hits.nonzero().tolist():
        if len(finished[b]) < beam:
            ids = tokens[b * beam + cand_beams[b, j], 1:].tolist()
            finished[b].append((cand_scores[b, j].item() / length**lenpen, ids))


def finish_live(finished: list, tokens: Tensor, scores: Tensor, beam: int, lenpen: float) -> None:
    """At max_len, the live beams of unfinished sentences join their finished ones as if EOS came
    next."""
    length = tokens.shape[1]  # max_len tokens + the virtual EOS
    for b, f in enumerate(finished):
        if len(f) < beam:
            f.extend(
                (s / length**lenpen, tokens[b * beam + j, 1:].tolist())
                for j, s in enumerate(scores[b].tolist())
                if s != float("-inf")
            )


def _beam(
    model, src: Tensor, src_mask: Tensor, rules: _Rules, beam: int, lenpen: float
) -> list[list[int]]:
    """Best hypothesis per sentence by sum_logprob / len ** lenpen (len counts the EOS). Beams still
    live at `max_len` are scored as if EOS came next (length max_len + 1, no EOS log-probability:
    the model is not asked), or with `force_eos` (fairseq) take EOS as one more step, its
    log-probability scored. A sentence holding `beam` finished hypotheses leaves the batch with its
    beams."""
    bsz, eos_id = src.shape[0], rules.eos_id
    memory = model.encode(src, src_mask).repeat_interleave(beam, dim=0)
    mask = src_mask.repeat_interleave(beam, dim=0)
    with open_search(model, memory, mask, rules.max_len, rules.use_cache) as steps:
        tokens = torch.full((bsz * beam, 1), rules.start_id, dtype=torch.long, device=src.device)
        # all beams start equal: only beam 0 may expand at the first step, or the top-k would hold
        # `beam` copies
        scores = torch.full((bsz, beam), float("-inf"), device=src.device)
        scores[:, 0] = 0.0
        finished = [[] for _ in range(bsz)]
        live = list(range(bsz))  # the sentence of each group of `beam` rows
        for step in range(rules.max_len + rules.force_eos):
            rule = rules.length_rule(step)
            logp = rules.next_log_probs(steps, tokens, rule)
            vocab, n = logp.shape[-1], len(live)
            cand = (scores.view(-1, 1) + logp).view(n, beam * vocab)
            cand_scores, cand_idx = cand.topk(min(2 * beam, beam * vocab), dim=1)
            cand_beams, cand_tokens = cand_idx // vocab, cand_idx % vocab
            groups = [finished[b] for b in live]
            finish_eos(groups, tokens, cand_scores, cand_beams, cand_tokens, eos_id, beam, lenpen)
            stay = [i for i, f in enumerate(groups) if len(f) < beam]
            if not stay or rule == "only_eos":  # at the forced EOS every live beam has ended
                break
            # the best `beam` non-EOS candidates go on: a stable sort moves EOS to the back, keeping
            # score order
            keep = torch.sort((cand_tokens == eos_id).int(), dim=1, stable=True).indices[:, :beam]
            scores, new = cand_scores.gather(1, keep), cand_tokens.gather(1, keep)
            rows = torch.arange(n, device=src.device)[:, None] * beam + cand_beams.gather(1, keep)
            if len(stay) < n:  # sentences that are done leave the batch
                kept = torch.tensor(stay, device=src.device)
                scores, new, rows = scores[kept], new[kept], rows[kept]
                live = [live[i] for i in stay]
            rows = rows.view(-1)
            tokens = torch.cat([tokens.index_select(0, rows), new.view(-1, 1)], dim=1)
            steps.select(rows)
        else:  # max_len reached before every sentence was done
            finish_live([finished[b] for b in live], tokens, scores, beam, lenpen)
        return [max(f, key=lambda h: h[0])[1] for f in finished]
