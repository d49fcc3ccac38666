"""Translation scores: detokenised sacreBLEU and chrF, and the tokenised compound-split BLEU of the
MoA paper.

These are different numbers for the same outputs. `corpus_scores` is sacreBLEU on detokenised text
with its own 13a tokenisation, comparable across papers and toolkits: quote it with its signature.
`tokenized_bleu` is what the MoA paper reported (fairseq's WMT14 En-De recipe: multi-bleu on
tokenised text with compound splitting), where each intra-word hyphen becomes a token of its own,
"a-b" -> "a ##AT##-##AT## b". The split adds tokens that mostly match (the ##AT##-##AT## markers,
and compound parts that are right on their own), so this BLEU is typically higher: compare a
MoA-paper number (28.4 for MoA base on WMT14 En-De) only with `tokenized_bleu`.
"""

from __future__ import annotations

import re

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

# lookarounds split every hyphen of a chain; fairseq's perl s{(\S)-(\S)}{...}g consumes the letters
# and leaves every second hyphen of "a-b-c" joined
_INTRA_WORD_HYPHEN = re.compile(r"(?<=\S)-(?=\S)")
_tokenize_13a = Tokenizer13a()


def check_lengths(hyps: list[str], refs: list[str]) -> None:
    # sacrebleu scores mismatched lists without complaint
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} hypotheses but {len(refs)} references: they must pair up line by line"
        )


def corpus_scores(hyps: list[str], refs: list[str]) -> dict:
    """Detokenised sacreBLEU (13a tokenisation) and chrF of one reference per hypothesis, with their
    signatures."""
    check_lengths(hyps, refs)
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": bleu.corpus_score(hyps, [refs]).score,
        "chrf": chrf.corpus_score(hyps, [refs]).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def compound_split(line: str) -> str:
    """fairseq's compound_split_bleu.sh rewrite: "Nord-Süd" -> "Nord ##AT##-##AT## Süd"."""
    return _INTRA_WORD_HYPHEN.sub(" ##AT##-##AT## ", line)


def tokenized_bleu(hyps: list[str], refs: list[str]) -> float:
    """BLEU as the MoA paper reported it: tokenise, split compounds, score with no further
    tokenisation.

    The paper tokenised with Moses; this uses sacreBLEU's 13a tokeniser
    (sacrebleu.tokenizers.tokenizer_13a), which treats apostrophes, escaping and some symbols
    differently, so expect a small gap to the paper's pipeline on the same outputs.
    """
    check_lengths(hyps, refs)
    split = [compound_split(_tokenize_13a(line)) for line in hyps + refs]
    return sacrebleu.corpus_bleu(split[: len(hyps)], [split[len(hyps) :]], tokenize="none").score
