"""Caption metrics against human references: CIDEr-D (Vedantam et al., 2015; the COCO caption evaluation's
variant: tf-idf n-gram vectors, clipped, a Gaussian length penalty, x10) and corpus BLEU-4 (Papineni et al.,
2002; the closest reference length). Tokens: lower case, punctuation removed, as the COCO evaluation does."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check(name: str, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{name}: one list of references per candidate, and at least one candidate")
    if any(isinstance(r, str) or not all(isinstance(x, str) for x in r) for r in references):
        raise TypeError(f"{name}: references[i] is a list of reference strings (one list per candidate)")


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of ``candidates[i]`` against ``references[i]`` (several per image), averaged over images; the
    document frequencies come from these references (as the COCO evaluation computes them)."""
    _check("cider", candidates, references)
    refs = [[[_ngrams(words(r), k) for k in range(1, n + 1)] for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for grams in r for g in grams})
    log_n = math.log(float(len(candidates)))

    def vec(grams: list[Counter]) -> tuple[list[dict], list[float], int]:
        out, norms = [], []
        for counts in grams:
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
            out.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return out, norms, sum(grams[1].values()) if len(grams) > 1 else sum(grams[0].values())

    scores = []
    for cand, rs in zip(candidates, refs):
        vc, nc, lc = vec([_ngrams(words(cand), k) for k in range(1, n + 1)])
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vc[k].items())
                if nc[k] and nr[k]:
                    total[k] += dot / (nc[k] * nr[k]) * penalty
        scores.append(10.0 * sum(total) / n / max(1, len(rs)))
    return sum(scores) / len(scores)


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4: clipped n-gram precisions (n = 1..4) pooled over every caption, geometric mean, brevity
    penalty against the reference length closest to each candidate's."""
    _check("bleu4", candidates, references)
    hits, totals = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, rs in zip(candidates, references):
        c = words(cand)
        rw = [words(r) for r in rs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rw)[1] if rw else 0
        for k in range(1, 5):
            counts = _ngrams(c, k)
            best: Counter = Counter()
            for r in rw:
                best |= _ngrams(r, k)
            hits[k - 1] += sum(min(v, best[g]) for g, v in counts.items())
            totals[k - 1] += max(0, len(c) - k + 1)
    if min(hits) == 0:
        return 0.0
    log_p = sum(math.log(h / t) for h, t in zip(hits, totals)) / 4
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(1, cand_len))
    return bp * math.exp(log_p)


__all__ = ["cider", "bleu4", "words"]
