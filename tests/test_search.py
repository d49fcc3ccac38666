"""Greedy and beam search on fake encoder-decoders: beam=1 is greedy, EOS and max_len end hypotheses
where they should, beam search beats greedy where greedy is known to be wrong, the length penalty
counts the EOS, and a sentence decodes the same alone as in a padded batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moa_train.models.search import beam_search, greedy_search, max_output_len
from moa_train.models.search import search as run_search

PAD, BOS, EOS = 0, 1, 2
V = 12


class RandomSeq2Seq:
    """Logits from a fixed random linear map of [mean of the real source embeddings, the last target
    token's embedding, its position's embedding]: they depend on the source and the prefix and
    ignore padding. BOS and PAD get a large bias, so a search that let them through would emit
    them."""

    def __init__(self, seed: int, d: int = 8, max_pos: int = 64, eos_bias: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, d, generator=g)
        self.pos = torch.randn(max_pos, d, generator=g)
        self.proj = torch.randn(3 * d, V, generator=g) * 3.0 / math.sqrt(3 * d)
        self.bias = torch.zeros(V)
        self.bias[[BOS, PAD]] = 10.0
        self.bias[EOS] = eos_bias

    def encode(self, src, src_mask):
        return self.emb[src] * src_mask[..., None]

    def decode(self, tgt_in, memory, src_mask, last_only=False):
        b, t = tgt_in.shape
        ctx = memory.sum(1) / src_mask.sum(1, keepdim=True)
        h = torch.cat(
            [ctx[:, None].expand(b, t, -1), self.emb[tgt_in], self.pos[:t].expand(b, t, -1)], dim=-1
        )
        logits = h @ self.proj + self.bias
        return logits[:, -1:] if last_only else logits


class EosAt(RandomSeq2Seq):
    """EOS is the best token at output position k and never likely before or after it."""

    def __init__(self, seed: int, k: int):
        super().__init__(seed)
        self.k = k

    def decode(self, tgt_in, memory, src_mask, last_only=False):
        logits = super().decode(tgt_in, memory, src_mask)
        at_k = torch.arange(tgt_in.shape[1]) == self.k
        logits[..., EOS] = torch.where(at_k, 50.0, -50.0)
        return logits[:, -1:] if last_only else logits


class Bigram:
    """The next token depends only on the last one, from a table of probabilities (the rest get
    e^-30)."""

    def __init__(self, probs: dict):
        self.table = torch.full((V, V), -30.0)
        for prev, row in probs.items():
            for tok, p in row.items():
                self.table[prev, tok] = math.log(p)

    def encode(self, src, src_mask):
        return torch.zeros(*src.shape, 1)

    def decode(self, tgt_in, memory, src_mask, last_only=False):
        return self.table[tgt_in[:, -1:] if last_only else tgt_in]


A, B, C, D, E = 3, 4, 5, 6, 7
# greedy takes A (0.63) then C (0.48): log-prob -1.2 over 3 tokens with the EOS; [B] has log-prob
# -1.0 over 2
P_B = math.exp(-1.0)
P_C = math.exp(-1.2) / (1 - P_B)
TRAP = Bigram(
    {
        BOS: {A: 1 - P_B, B: P_B},
        A: {C: P_C, D: (1 - P_C) / 2, E: (1 - P_C) / 2},
        B: {EOS: 1.0},
        C: {EOS: 1.0},
        D: {EOS: 1.0},
        E: {EOS: 1.0},
    }
)


def random_batch(seed: int, bsz: int = 6, max_src: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_src + 1, (bsz,), generator=g)
    mask = torch.arange(max_src)[None] < lengths[:, None]
    src = torch.randint(3, V, (bsz, max_src), generator=g).masked_fill(~mask, PAD)
    return src, mask


def total_log_prob(model, src, src_mask, hyp: list) -> float:
    """The model's log-probability of hyp followed by EOS."""
    tgt_in = torch.tensor([[BOS] + hyp])
    gold = torch.tensor([hyp + [EOS]])
    logits = model.decode(tgt_in, model.encode(src, src_mask), src_mask)
    return F.log_softmax(logits.float(), dim=-1).gather(-1, gold[..., None]).sum().item()


def search(kind, model, src, mask, max_len, **kw):
    if kind == "greedy":
        return greedy_search(model, src, mask, BOS, EOS, PAD, max_len)
    return beam_search(model, src, mask, BOS, EOS, PAD, max_len, beam=kind, **kw)


KINDS = ["greedy", 1, 2, 4]


def test_search_runs_greedy_without_beam_and_the_old_names_fix_its_beam():
    """One entry point: beam=None is greedy, n beams is beam search (4 in beam_search unless
    given), and a setting given by position after max_len is refused, not read as another one."""
    model, (src, mask) = RandomSeq2Seq(1), random_batch(1)
    args = (model, src, mask, BOS, EOS, PAD, 9)
    greedy, beam2, beam4 = (run_search(*args, beam=b) for b in (None, 2, 4))
    assert len({str(greedy), str(beam2), str(beam4)}) == 3  # the checks below can tell them apart
    assert greedy_search(*args) == run_search(*args) == greedy
    assert beam_search(*args) == beam4 and beam_search(*args, beam=2) == beam2
    assert run_search(*args, 2, 0.6) == beam2  # beam and lenpen by position, as beam_search had
    with pytest.raises(TypeError):
        greedy_search(*args, False)
    with pytest.raises(TypeError):
        beam_search(*args, 2)


def test_beam1_equals_greedy():
    max_len, lengths = 12, []
    for seed in range(20):
        model, (src, mask) = RandomSeq2Seq(seed), random_batch(seed)
        greedy = search("greedy", model, src, mask, max_len)
        assert search(1, model, src, mask, max_len) == greedy
        lengths += [len(h) for h in greedy]
    # both ways of ending were exercised: by EOS and by max_len
    assert min(lengths) < max_len and max(lengths) == max_len


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_hold_no_special_tokens_and_respect_max_len(kind):
    for seed in range(5):
        model, (src, mask) = RandomSeq2Seq(seed), random_batch(seed)
        for hyp in search(kind, model, src, mask, max_len=9):
            assert len(hyp) <= 9
            assert not {BOS, PAD, EOS} & set(hyp)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_stops_where_eos_is_best(kind, k):
    src, mask = random_batch(k)
    hyps = search(kind, EosAt(k, k), src, mask, max_len=12)
    assert [len(h) for h in hyps] == [k] * len(hyps)


@pytest.mark.parametrize("kind", KINDS)
def test_max_len_cuts_hypotheses_without_eos(kind):
    src, mask = random_batch(0)
    hyps = search(kind, EosAt(0, k=20), src, mask, max_len=6)
    assert [len(h) for h in hyps] == [6] * len(hyps)
    assert search(kind, EosAt(0, k=20), src, mask, max_len=0) == [[]] * len(hyps)


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_finds_a_likelier_sequence_than_greedy(beam):
    src, mask = random_batch(0, bsz=3)
    greedy = search("greedy", TRAP, src, mask, max_len=5)
    beamed = search(beam, TRAP, src, mask, max_len=5, lenpen=0.0)
    assert greedy == [[A, C]] * 3 and beamed == [[B]] * 3
    for g, b in zip(greedy, beamed, strict=True):
        assert total_log_prob(TRAP, src[:1], mask[:1], b) > total_log_prob(
            TRAP, src[:1], mask[:1], g
        )


def test_length_penalty_counts_the_eos():
    # [B] scores -1.0 / 2**lenpen, [A, C] scores -1.2 / 3**lenpen: they swap at lenpen = ln 1.2 / ln
    # 1.5 = 0.45 (at ln 1.2 / ln 2 = 0.26 if the EOS were not counted)
    src, mask = random_batch(0, bsz=2)
    assert search(2, TRAP, src, mask, max_len=5, lenpen=0.3) == [[B]] * 2
    assert search(2, TRAP, src, mask, max_len=5, lenpen=0.6) == [[A, C]] * 2
    # cut by max_len before its EOS, [A, C] is scored as if the EOS came next: length 3 still
    assert search(2, TRAP, src, mask, max_len=2, lenpen=0.6) == [[A, C]] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_one_sentence_at_a_time(kind):
    for seed in range(3):
        model, (src, mask) = RandomSeq2Seq(seed), random_batch(seed)
        batch = search(kind, model, src, mask, max_len=10)
        alone = []
        for i, n in enumerate(mask.sum(1).tolist()):
            alone += search(kind, model, src[i : i + 1, :n], mask[i : i + 1, :n], max_len=10)
        assert batch == alone


class AllPositions(RandomSeq2Seq):
    """A model whose decode knows no last_only: logits for every position."""

    def decode(self, tgt_in, memory, src_mask, **kwargs):
        return super().decode(tgt_in, memory, src_mask)


@pytest.mark.parametrize("kind", KINDS)
def test_search_reads_the_last_position_of_full_logits_too(kind):
    src, mask = random_batch(1)
    assert search(kind, AllPositions(1), src, mask, max_len=8) == search(
        kind, RandomSeq2Seq(1), src, mask, max_len=8
    )


def test_max_output_len_uses_the_longest_real_source():
    mask = torch.arange(7)[None] < torch.tensor([[3], [5]])
    assert max_output_len(mask) == int(1.2 * 5 + 10)
    assert max_output_len(F.pad(mask, (0, 4)), a=2.0, b=1) == 11
