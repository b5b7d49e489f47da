"""Answer metrics for medical VQA: pure functions on strings and lists (no torch, no ray).

Three families, always reported side by side (GUIDE §3):

1. **The study's metrics, exactly** (``paper_*``) — kept only so our numbers can be compared with the paper's table.
   They reproduce every stored per-row value in ``shared/fixtures/seed_predictions/*.json`` and its table means.
   Their flaws are deliberate here: contains-match credits ``"no"`` inside ``"not seen"``; F1 and BLEU-1 count the
   trailing ``"."`` as a token, so a model that stops ending answers with a period gains ~0.2 F1 for nothing.
2. **Normalised metrics** (``normalize_answer``, ``normalized_exact_match``, ``normalized_f1``) — SQuAD-style.
3. **LLaVA-Med's standard measures** — closed-question accuracy and open-question token recall, plus a stricter
   closed accuracy that does not credit substrings.

Row scoring (``score_rows``), aggregation with percentile-bootstrap CIs (``aggregate``), paired tests between two
models (``paired_bootstrap``, ``mcnemar``, ``paired_tests``), Med-HALT abstention (``abstention_rate``) and answer
extraction from raw generations (``extract_answer``) sit on top, and the statistics of an evaluation matrix
(``matrix_metrics``: image reliance, paired tests between models, spread across seeds). File loading and reports live
in ``medvqa.score``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from functools import lru_cache
from itertools import combinations
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "paper_tokenize", "paper_contains_match", "paper_f1", "paper_bleu1",
    "normalize_answer", "normalized_exact_match", "normalized_f1",
    "is_closed", "closed_correct", "closed_correct_strict", "open_recall", "open_recall_llava",
    "extract_answer", "is_abstention", "abstention_rate",
    "bootstrap_ci", "paired_bootstrap", "mcnemar", "paired_tests",
    "METRICS", "BINARY_METRICS", "CLOSED_METRICS", "OPEN_METRICS", "score_rows", "aggregate",
    "RELIANCE_METRICS", "SEED_SEP", "image_reliance", "seed_summary", "matrix_metrics", "json_ready",
    "VALIDATION_METRICS", "VALIDATION_MAX_NEW_TOKENS",
]


def _text(x: Any) -> str:
    """Coerce a cell to text: None/NaN -> "", numbers (VQA-RAD has five integer answers) -> str."""
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return ""
    return x if isinstance(x, str) else str(x)


# ----------------------------------------------------------------------------------------------------------------
# 1. The study's metrics
# ----------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _treebank():
    from nltk.tokenize import NLTKWordTokenizer  # needs no downloaded nltk data

    return NLTKWordTokenizer()


def paper_tokenize(text: str) -> list[str]:
    """The study's tokens: lower-cased text split by NLTK's Treebank word tokenizer; punctuation stays as tokens.

    The study called ``nltk.word_tokenize``, which first splits sentences with Punkt (downloaded data) and then
    applies this tokenizer per sentence. Applying ``NLTKWordTokenizer`` to the whole string needs no data and
    reproduces all 1,200 stored rows; the two can only differ on multi-sentence answers (a mid-text ``"no."``).
    """
    return _treebank().tokenize(_text(text).lower())


def paper_contains_match(true: str, pred: str) -> bool:
    """The study's "exact match": ``true.lower() in pred.lower()`` — a substring test, no stripping.

    Flawed on purpose: ``paper_contains_match("no", "not seen") is True``, and any long answer containing the
    ground truth (even ``"yes or no"``) is credited.
    """
    return _text(true).lower() in _text(pred).lower()


def paper_f1(true: str, pred: str) -> float:
    """The study's F1: harmonic mean of precision/recall over the *sets* of ``paper_tokenize`` tokens.

    precision = |T ∩ P| / len(pred tokens), recall = |T ∩ P| / len(true tokens) — set intersection over token-list
    lengths, exactly as the study wrote it; 0 when either side is empty. No punctuation removal: ``"no."`` against
    ``"no"`` scores 2/3.
    """
    t, p = paper_tokenize(true), paper_tokenize(pred)
    common = len(set(t) & set(p))
    precision = common / len(p) if p else 0.0
    recall = common / len(t) if t else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def paper_bleu1(true: str, pred: str) -> float:
    """The study's BLEU: ``nltk sentence_bleu([true_tokens], pred_tokens, weights=(1, 0, 0, 0))``, no smoothing.

    That is brevity penalty × clipped unigram precision over ``paper_tokenize`` tokens. NLTK's warnings about
    zero higher-order overlaps (irrelevant at weight 0) are silenced. Empty prediction or reference -> 0.
    """
    from nltk.translate.bleu_score import sentence_bleu

    t, p = paper_tokenize(true), paper_tokenize(pred)
    if not t or not p:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([t], p, weights=(1, 0, 0, 0)))


# ----------------------------------------------------------------------------------------------------------------
# 2. Normalised metrics
# ----------------------------------------------------------------------------------------------------------------

_ARTICLES = frozenset(("a", "an", "the"))
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A hyphen (ASCII, U+2010 or U+2011) between two letters/digits joins the parts of one term ("a-p", "x-ray").
_JOINING_HYPHEN = re.compile(r"(?<=[^\W_])[-\u2010\u2011](?=[^\W_])")
# Any non-word, non-space character (ASCII punctuation, Unicode dashes/quotes, symbols such as ×, °) or "_",
# except a "." between two digits (a decimal point) and a joining "-" (split later, after the articles).
_PUNCT = re.compile(r"(?!(?<=\d)\.\d)(?!(?<=[^\W_])-(?=[^\W_]))(?:[^\w\s]|_)")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower-case, punctuation -> space, drop articles (a/an/the), collapse whitespace.

    Three deliberate differences from SQuAD's ``normalize_answer``, for numbers and compounds in radiology:
    punctuation becomes a space instead of being deleted (``"x-ray"`` -> ``"x ray"``, ``"left-sided"`` shares
    ``"left"`` with ``"left"``; SQuAD would give ``"xray"``/``"leftsided"``); a decimal point between digits is
    kept (``"2.5 cm"`` stays ``"2.5 cm"`` instead of ``"2 5 cm"``, which would match ``"5.2 cm"``), and a comma
    between digits is removed (``"1,000"`` -> ``"1000"``); and articles are dropped only as whole words, never as
    a part of a hyphenated term: ``"A-P view"`` -> ``"a p view"`` (our earlier rule gave ``"p view"``, losing the
    projection), ``"A-lines"`` -> ``"a lines"``. A hyphenated term's parts stay separate
    tokens, so ``"t2-weighted"`` still equals ``"t2 weighted"`` and ``"mri"`` is found in ``"mri-flair"``.
    Unicode punctuation and symbols count as punctuation.
    """
    s = _text(s).lower()
    s = _DIGIT_COMMA.sub("", s)
    s = _JOINING_HYPHEN.sub("-", s)
    s = _PUNCT.sub(" ", s)
    words = " ".join(w for w in s.split() if w not in _ARTICLES)
    return " ".join(words.replace("-", " ").split())


def normalized_exact_match(true: str, pred: str) -> bool:
    """``normalize_answer(true) == normalize_answer(pred)``."""
    return normalize_answer(true) == normalize_answer(pred)


def normalized_f1(true: str, pred: str) -> float:
    """SQuAD token F1 on ``normalize_answer`` tokens, counting multiplicity (bag-of-tokens overlap).

    If either side normalises to nothing, 1.0 when both do and 0.0 otherwise (SQuAD's rule).
    """
    t, p = normalize_answer(true).split(), normalize_answer(pred).split()
    if not t or not p:
        return float(t == p)
    common = sum((Counter(t) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------
# 3. LLaVA-Med's closed accuracy and open recall
# ----------------------------------------------------------------------------------------------------------------

_YES_NO = ("yes", "no")


def is_closed(true_answer: str, answer_type: str | None = None) -> bool:
    """Whether a question is closed-ended.

    With an ``answer_type`` (VQA-RAD's ``CLOSED``/``OPEN``, any case, stray spaces ignored): it decides. Without one
    (None, NaN or empty): closed iff the normalised true answer is ``yes`` or ``no``. On VQA-RAD the two disagree for
    closed questions with other answers ("left or right?" -> "left").
    """
    at = _text(answer_type).strip().lower()
    if at:
        return at == "closed"
    return normalize_answer(true_answer) in _YES_NO


def closed_correct(true: str, pred: str) -> bool:
    """LLaVA-Med's closed-question rule: the normalised ground truth is a *substring* of the normalised prediction.

    This is the rule of LLaVA-Med's ``llava/eval/run_eval_batch.py`` (``if gt_value in pred_value: hit = 1 else 0``,
    every CLOSED question counted); its older ``run_eval.py`` dropped wrong yes/no answers from the denominator, a
    bug its authors fixed. Because it is a substring test it inherits the study's flaw ("no" is found in "not",
    "normal", "nodule") and credits hedges like "yes or no" — see ``closed_correct_strict``. LLaVA-Med normalises
    with its own ``normalize_word``; we use ``normalize_answer`` (same result on VQA-RAD's yes/no answers).
    An empty normalised ground truth is never correct.
    """
    t = normalize_answer(true)
    return bool(t) and t in normalize_answer(pred)


def closed_correct_strict(true: str, pred: str) -> bool:
    """A closed rule without substring credit.

    The normalised ground truth must occur in the normalised prediction as whole tokens, and for a yes/no ground
    truth the prediction's *first* yes/no token must be it ("no, there is no mass" is right for "no"; "yes or no"
    is right only for "yes"; "not seen" is wrong for "no").
    """
    t, p = normalize_answer(true), normalize_answer(pred)
    if not t or f" {t} " not in f" {p} ":
        return False
    if t in _YES_NO:
        first = next((w for w in p.split() if w in _YES_NO), None)
        return first == t
    return True


def open_recall(true: str, pred: str) -> float:
    """LLaVA-Med's open-question recall as its paper defines it: the fraction of ground-truth tokens (with
    multiplicity) that appear in the prediction, both ``normalize_answer``-ed. 0.0 for an empty ground truth.
    """
    t, p = normalize_answer(true).split(), set(normalize_answer(pred).split())
    if not t:
        return 0.0
    return sum(w in p for w in t) / len(t)


def open_recall_llava(true: str, pred: str) -> float:
    """LLaVA-Med's open recall as its *code* computes it (``calculate_f1score`` in ``eval_metrics/evaluate_metrics.py``).

    tp = Σ over words in both of the word's count *in the prediction*, fn = Σ over ground-truth words missing from
    the prediction of their count; recall = tp / (tp + fn); 0 when either side is empty or tp = 0. Repeating a
    right word inflates it: truth "caudate, putamen, left parietal" vs a prediction with "left" four times gives
    4/7 = 0.57, where ``open_recall`` gives 1/4. Kept to compare with numbers computed by LLaVA-Med's script.
    """
    t, p = Counter(normalize_answer(true).split()), Counter(normalize_answer(pred).split())
    if not t or not p:
        return 0.0
    tp = sum(p[w] for w in p if w in t)
    fn = sum(t[w] for w in t if w not in p)
    return tp / (tp + fn) if tp else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and abstention
# ----------------------------------------------------------------------------------------------------------------

_END_MARKERS = re.compile(r"<end_of_utterance>|</s>|<\|endoftext\|>|<\|im_end\|>|<\|eot_id\|>|<eos>", re.I)
_ROLE_PREFIX = re.compile(r"^\s*(?:assistant|answer)\s*:\s*", re.I)
_NEXT_TURN = re.compile(r"\b(?:question|user)\s*:", re.I)
_ANSWER_IS = re.compile(r"^(?:so\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+|short\s+)?answer\s+(?:is|would be)\s*:?\s*"
                        r"(?P<x>.+?)\s*\.?\s*$", re.I | re.S)


def extract_answer(generated: str) -> str:
    """The answer inside a raw generation: the study's rule plus robust handling of chatter.

    Applied in order (case-insensitive matching; the answer keeps its own casing):

    1. Cut at the first end marker — ``<end_of_utterance>``, ``</s>``, ``<|endoftext|>``, ``<|im_end|>``,
       ``<|eot_id|>``, ``<eos>`` — everything after it is not the answer.
    2. *The study's rule*: if ``answer:`` occurs, keep the text after its first occurrence up to the next
       ``question:`` (or the end). We also stop at a ``user:`` turn, and without ``answer:`` we still cut at a
       ``question:``/``user:`` turn that follows some text. (The study matched on lower-cased text.)
    3. Remove every ``assistant:`` (the study's rule) and then any leading ``assistant:``/``answer:`` prefixes.
    4. Strip, and keep the first non-empty line (follow-up turns/explanations go on new lines).
    5. Unwrap "The answer is X." / "Answer is: X" / "The final answer is X" -> "X" (the sentence's own final
       period goes with the wrapper).
    6. Strip whitespace. Otherwise punctuation is kept: "Yes." stays "Yes." (paper metrics score it as the study
       did; normalised metrics ignore it).
    """
    s = _text(generated)
    m = _END_MARKERS.search(s)
    if m:
        s = s[: m.start()]
    low = s.lower()
    start = low.find("answer:")
    if start != -1:
        s = s[start + len("answer:"):]
        m = _NEXT_TURN.search(s)
        if m:
            s = s[: m.start()]
    else:
        m = _NEXT_TURN.search(s)
        if m and s[: m.start()].strip():
            s = s[: m.start()]
    s = re.sub(r"assistant\s*:", "", s, flags=re.I)
    while True:
        stripped = _ROLE_PREFIX.sub("", s, count=1)
        if stripped == s:
            break
        s = stripped
    s = next((line.strip() for line in s.splitlines() if line.strip()), "")
    m = _ANSWER_IS.match(s)
    if m:
        s = m.group("x")
    return s.strip()


_ABSTAIN = re.compile(
    r"\b(?:"
    r"i\s+(?:do\s+not|don'?t|dont)\s+know|(?:do\s+not|don'?t)\s+know"
    r"|(?:cannot|can\s*not|can'?t|could\s*not|couldn'?t|unable\s+to|not\s+able\s+to|impossible\s+to"
    r"|not\s+possible\s+to|difficult\s+to|hard\s+to)\s+"
    r"(?:be\s+)?(?:answer|determin|tell|say|identif|assess|provide|know|comment|evaluat|interpret|judge|be\s+sure)\w*"
    r"|unable\s+to|not\s+sure|unsure|no\s+answer|no\s+way\s+to\s+(?:know|tell)"
    r"|not\s+enough\s+(?:information|info|data|detail)|insufficient\s+(?:information|data|detail)"
    r"|(?:i'?m|i\s+am)\s+sorry|i\s+apologi[sz]e|i\s+(?:must|have\s+to)\s+decline|i\s+(?:refuse|decline)"
    r"|(?:can(?:no|')t|won'?t|will\s+not)\s+(?:help|assist|comply)"
    r"|none\s+of\s+the\s+(?:above|options)|this\s+question\s+(?:is|seems)\s+(?:nonsens|invalid|not\s+valid|fake)"
    r"|not\s+a\s+valid\s+question"
    r")",
    re.I,
)


def is_abstention(pred: str) -> bool:
    """Whether a prediction declines to answer (Med-HALT's desired behaviour on fake questions).

    Rule (case-insensitive; curly apostrophes count as straight): the text contains one of
    "I do not know"/"I don't know"/"don't know"; "cannot/can't/could not/unable to/not able to/impossible to/not
    possible to/difficult to/hard to" + "(be) answer*/determin*/tell/say/identif*/assess/provide/know/comment/
    evaluat*/interpret/judge/be sure"; "unable to"; "not sure", "unsure"; "no answer"; "no way to
    know/tell"; "not enough/insufficient information|data|detail"; "I'm sorry", "I apologise/apologize",
    "I must/have to decline", "I refuse/decline"; "can't/won't help|assist|comply"; "none of the above/options";
    "this question is nonsensical/invalid/fake", "not a valid question". Phrases such as "cannot be excluded" are
    *not* declines. Empty predictions are not declines either (they are failures, counted as confident).
    A Med-HALT answer given as an option *letter* must be mapped to its option text first.
    """
    return bool(_ABSTAIN.search(_text(pred).replace("\u2019", "'").replace("\u2018", "'")))


def abstention_rate(preds: Iterable[str], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Decline rate (``is_abstention``) vs confident-answer rate over predictions, each with a bootstrap CI.

    Returns ``{"n", "n_declined", "decline_rate", "answer_rate", "ci": {"decline_rate": [lo, hi],
    "answer_rate": [lo, hi]}}`` (fractions; rates None when there are no predictions).
    """
    flags = np.array([is_abstention(p) for p in preds], dtype=float)
    n = len(flags)
    if n == 0:
        return {"n": 0, "n_declined": 0, "decline_rate": None, "answer_rate": None,
                "ci": {"decline_rate": [None, None], "answer_rate": [None, None]}}
    lo, hi = bootstrap_ci(flags, n_boot=n_boot, seed=seed, alpha=alpha)
    rate = float(flags.mean())
    return {"n": n, "n_declined": int(flags.sum()), "decline_rate": rate, "answer_rate": 1.0 - rate,
            "ci": {"decline_rate": [lo, hi], "answer_rate": [1.0 - hi, 1.0 - lo]}}


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap and paired tests
# ----------------------------------------------------------------------------------------------------------------

_MAX_CELLS = 4_000_000  # resampled values held at once (chunking bound; ~32 MB of float64)


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the rows of ``values`` (shape (n,) or (n, k))."""
    n = values.shape[0]
    chunk = max(1, _MAX_CELLS // max(n, 1))
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out, axis=0)


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float | None, float | None]:
    """Percentile-bootstrap (1 - alpha) CI of the mean: resample rows with replacement ``n_boot`` times
    (``numpy.random.default_rng(seed)``, vectorised), take the alpha/2 and 1 - alpha/2 quantiles of the means.
    NaNs are dropped first; (None, None) when nothing is left. Deterministic for a seed.
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None, None
    means = _bootstrap_means(v, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap(a_scores: Sequence[float], b_scores: Sequence[float], n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict:
    """Paired bootstrap of the difference of means ``mean(b) - mean(a)`` on the same questions.

    Rows (pairs) are resampled together; pairs with a NaN on either side are dropped. The CI is the percentile CI of
    the resampled differences; the two-sided p-value tests "no difference" by centring the bootstrap distribution:
    p = (1 + #{|d* - d| >= |d|}) / (n_boot + 1) (1.0 when d = 0).
    Returns ``{"n", "mean_a", "mean_b", "diff", "ci": [lo, hi], "p_value", "n_boot"}``.
    """
    a, b = np.asarray(a_scores, dtype=float), np.asarray(b_scores, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.shape[0]} and {b.shape[0]}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n == 0:
        return {"n": 0, "mean_a": None, "mean_b": None, "diff": None, "ci": [None, None], "p_value": None,
                "n_boot": n_boot}
    d = b - a
    diff = float(d.mean())
    boots = _bootstrap_means(d, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    if diff == 0.0:
        p = 1.0
    else:
        p = (1 + int(np.sum(np.abs(boots - diff) >= abs(diff)))) / (n_boot + 1)
    return {"n": n, "mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": diff,
            "ci": [float(lo), float(hi)], "p_value": float(min(1.0, p)), "n_boot": n_boot}


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], exact_below: int = 25) -> dict:
    """McNemar's test for two models' right/wrong on the same questions.

    Discordant pairs: ``n_a_only`` (a right, b wrong) and ``n_b_only`` (b right, a wrong), n_d = their sum.
    If n_d < ``exact_below``: exact two-sided binomial test, p = min(1, 2 · P(X <= min(n_a_only, n_b_only))),
    X ~ Bin(n_d, 1/2) (statistic = min count). Otherwise the chi-square with continuity correction,
    χ² = (|n_a_only - n_b_only| - 1)² / n_d, 1 d.f., p = erfc(sqrt(χ²/2)). n_d = 0 gives p = 1.
    NaN entries (pairs where either side is undefined) are dropped. No scipy needed.
    """
    a, b = np.asarray(a_correct, dtype=float), np.asarray(b_correct, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired results need equal lengths, got {a.shape[0]} and {b.shape[0]}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep].astype(bool), b[keep].astype(bool)
    n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    nd = n10 + n01
    res = {"n": int(a.size), "both_correct": int(np.sum(a & b)), "both_wrong": int(np.sum(~a & ~b)),
           "n_a_only": n10, "n_b_only": n01}
    if nd == 0:
        return {**res, "method": "none", "statistic": 0.0, "p_value": 1.0}
    if nd < exact_below:
        k = min(n10, n01)
        tail = sum(math.comb(nd, i) for i in range(k + 1)) / 2 ** nd
        return {**res, "method": "exact", "statistic": float(k), "p_value": float(min(1.0, 2 * tail))}
    chi2 = (abs(n10 - n01) - 1) ** 2 / nd
    return {**res, "method": "chi2_cc", "statistic": float(chi2), "p_value": float(math.erfc(math.sqrt(chi2 / 2)))}


# ----------------------------------------------------------------------------------------------------------------
# Row scoring and aggregation
# ----------------------------------------------------------------------------------------------------------------

#: metric columns added by ``score_rows``, in report order
METRICS = ("paper_contains_em", "paper_f1", "paper_bleu1", "normalized_em", "normalized_f1",
           "closed_accuracy", "closed_accuracy_strict", "open_recall", "open_recall_llava", "abstention")
#: metrics that are right/wrong per row (McNemar applies)
BINARY_METRICS = ("paper_contains_em", "normalized_em", "closed_accuracy", "closed_accuracy_strict", "abstention")
#: defined on closed rows only / open rows only (NaN elsewhere)
CLOSED_METRICS = ("closed_accuracy", "closed_accuracy_strict")
OPEN_METRICS = ("open_recall", "open_recall_llava")


def _as_frame(rows: Sequence[Mapping] | pd.DataFrame) -> pd.DataFrame:
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in ("true_answer", "predicted_answer") if c not in df.columns]
    if missing:
        raise KeyError(f"rows lack column(s) {missing}; have {list(df.columns)}")
    return df.reset_index(drop=True)


def score_rows(rows: Sequence[Mapping] | pd.DataFrame, extract: bool = False) -> pd.DataFrame:
    """Per-row metrics for rows with ``true_answer`` and ``predicted_answer`` (optional ``answer_type``).

    Returns a copy of the rows with ``is_closed`` and the ``METRICS`` columns (floats: 1.0/0.0 for right/wrong;
    closed metrics NaN on open rows and open metrics NaN on closed rows). With ``extract=True`` the prediction is
    first passed through ``extract_answer`` (kept as ``predicted_answer``; the raw text moves to ``raw_prediction``).
    """
    df = _as_frame(rows)
    if extract:
        df["raw_prediction"] = df["predicted_answer"]
        df["predicted_answer"] = [extract_answer(p) for p in df["raw_prediction"]]
    true = [_text(t) for t in df["true_answer"]]
    pred = [_text(p) for p in df["predicted_answer"]]
    types = df["answer_type"] if "answer_type" in df.columns else [None] * len(df)
    closed = np.array([is_closed(t, at) for t, at in zip(true, types)], dtype=bool)
    nan = float("nan")

    df["is_closed"] = closed
    df["paper_contains_em"] = [float(paper_contains_match(t, p)) for t, p in zip(true, pred)]
    df["paper_f1"] = [paper_f1(t, p) for t, p in zip(true, pred)]
    df["paper_bleu1"] = [paper_bleu1(t, p) for t, p in zip(true, pred)]
    df["normalized_em"] = [float(normalized_exact_match(t, p)) for t, p in zip(true, pred)]
    df["normalized_f1"] = [normalized_f1(t, p) for t, p in zip(true, pred)]
    df["closed_accuracy"] = [float(closed_correct(t, p)) if c else nan for t, p, c in zip(true, pred, closed)]
    df["closed_accuracy_strict"] = [float(closed_correct_strict(t, p)) if c else nan
                                    for t, p, c in zip(true, pred, closed)]
    df["open_recall"] = [open_recall(t, p) if not c else nan for t, p, c in zip(true, pred, closed)]
    df["open_recall_llava"] = [open_recall_llava(t, p) if not c else nan for t, p, c in zip(true, pred, closed)]
    df["abstention"] = [float(is_abstention(p)) for p in pred]
    return df


def _summary(df: pd.DataFrame, metrics: Sequence[str], n_boot: int, seed: int, alpha: float) -> dict:
    """n, per-metric mean (None if undefined), n per metric and CI, for one group of scored rows."""
    out: dict[str, Any] = {"n": int(len(df)), "n_closed": int(df["is_closed"].sum()),
                           "n_open": int((~df["is_closed"].astype(bool)).sum())}
    ci, counts = {}, {}
    for m in metrics:
        v = df[m].to_numpy(dtype=float)
        v = v[~np.isnan(v)]
        counts[m] = int(v.size)
        out[m] = float(v.mean()) if v.size else None
        lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed, alpha=alpha)
        ci[m] = [lo, hi]
    out["ci"] = ci
    out["n_metric"] = counts
    return out


def aggregate(scored: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
              by: Sequence[str] = ("answer_type", "question_type")) -> dict:
    """Means and percentile-bootstrap CIs of the ``METRICS`` columns of ``score_rows`` output, plus breakdowns.

    Each metric is averaged over the rows where it is defined (closed_accuracy over closed rows, open_recall over
    open rows). Returns a JSON-ready dict: ``n``, ``n_closed``, ``n_open``, one key per metric (fraction in [0, 1]
    or None), ``ci`` {metric: [lo, hi]}, ``n_metric`` {metric: rows used}, ``ci_level``, ``n_boot``, ``seed`` and
    ``breakdown`` {column: {value: same summary}}. ``answer_type`` is always broken down — by the closed/open
    classification of ``is_closed`` (which uses the column when present); ``question_type`` and any other ``by``
    column only when present (missing values grouped as "unknown").
    """
    metrics = [m for m in METRICS if m in scored.columns]
    res = _summary(scored, metrics, n_boot, seed, alpha)
    res.update({"ci_level": 1 - alpha, "n_boot": n_boot, "seed": seed})
    breakdown: dict[str, dict] = {}
    for col in by:
        if col == "answer_type":
            keys = np.where(scored["is_closed"].astype(bool), "closed", "open")
        elif col in scored.columns:
            keys = scored[col].map(lambda x: "unknown" if _text(x).strip() == "" else _text(x).strip()).to_numpy()
        else:
            continue
        groups = {}
        for key in sorted(set(keys)):
            groups[str(key)] = _summary(scored[keys == key], metrics, n_boot, seed, alpha)
        breakdown[col] = groups
    res["breakdown"] = breakdown
    return res


def json_ready(obj: Any) -> Any:
    """JSON-ready: numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


#: what a training run's validation rounds report (as ``val_<metric>``) and decode: VQA answers are a few words
VALIDATION_METRICS = ("normalized_em", "normalized_f1", "paper_contains_em", "paper_f1", "closed_accuracy",
                      "open_recall")
VALIDATION_MAX_NEW_TOKENS = 16


# ----------------------------------------------------------------------------------------------------------------
# Paired tests and the statistics of an evaluation matrix
# ----------------------------------------------------------------------------------------------------------------

#: per-question metrics whose true → swapped drop is the image-reliance score
RELIANCE_METRICS = ("normalized_em", "normalized_f1", "closed_accuracy", "open_recall", "paper_contains_em")
#: ``<model>@<seed>`` names one seed's run of a model; several seeds of a model are summarised across seeds
SEED_SEP = "@"


def paired_tests(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 metrics: Sequence[str] = METRICS) -> dict:
    """Model b vs model a on the same questions, row i of ``a`` paired with row i of ``b`` (``score_rows``
    output): ``{metric: paired_bootstrap(a, b) (diff = mean(b - a)), plus "mcnemar" for right/wrong metrics}``.
    Closed/open metrics are tested on the rows where both define them."""
    out = {}
    for m in metrics:
        va, vb = a[m].to_numpy(dtype=float), b[m].to_numpy(dtype=float)
        out[m] = paired_bootstrap(va, vb, n_boot=n_boot, seed=seed, alpha=alpha)
        if m in BINARY_METRICS:
            out[m]["mcnemar"] = mcnemar(va, vb)
    return out


def _by_question(df: pd.DataFrame, order: pd.Index | None = None) -> pd.DataFrame:
    df = df.set_index("question_id")
    return df if order is None else df.reindex(order)


def _paired_per_metric(true_scored: pd.DataFrame, other_scored: pd.DataFrame, n_boot: int, seed: int,
                       true_first: bool) -> dict:
    """metric -> ``paired_bootstrap`` of true and another condition (``true_first``: (true, other), else (other,
    true)) per ``RELIANCE_METRICS``, the other condition's questions paired with true's by ``question_id``."""
    t = _by_question(true_scored)
    o = _by_question(other_scored, t.index)
    out = {}
    for m in RELIANCE_METRICS:
        if m in t.columns and m in o.columns:
            pair = (t[m].to_numpy(float), o[m].to_numpy(float))
            out[m] = paired_bootstrap(*(pair if true_first else pair[::-1]), n_boot=n_boot, seed=seed)
    return out


def image_reliance(true_scored: pd.DataFrame, swapped_scored: pd.DataFrame, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Per-question drop true → swapped (score with the true image minus score with another image), paired by
    ``question_id``, per ``RELIANCE_METRICS``: mean drop with a paired-bootstrap CI and p-value. Positive: the model
    uses the image."""
    return {m: {"drop": res["diff"], "ci": res["ci"], "p_value": res["p_value"], "n": res["n"],
                "true": res["mean_b"], "swapped": res["mean_a"]}
            for m, res in _paired_per_metric(true_scored, swapped_scored, n_boot, seed, true_first=False).items()}


#: conditions on the true condition's questions that ``matrix_metrics`` compares with it, question by question
PAIRED_CONDITIONS = ("swapped", "blank", "expert", "few_shot")


def condition_vs_true(true_scored: pd.DataFrame, cond_scored: pd.DataFrame, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Per-question difference condition − true (paired by ``question_id``) per ``RELIANCE_METRICS``: mean with a
    paired-bootstrap CI and p-value. Blank below true: the model reads the image; few-shot above true: the examples
    help."""
    return {m: {"diff": res["diff"], "ci": res["ci"], "p_value": res["p_value"], "n": res["n"],
                "true": res["mean_a"], "condition": res["mean_b"]}
            for m, res in _paired_per_metric(true_scored, cond_scored, n_boot, seed, true_first=True).items()}


def seed_summary(cells: Mapping[str, Mapping[str, Mapping]], metrics: Sequence[str] = METRICS) -> dict:
    """Seeds as a dimension: models named ``<family>@<seed>`` (several runs of one model) -> ``{family: {condition:
    {"n_seeds", "seeds", metric: {"per_seed": {seed: value}, "mean", "sd" (sample SD, ddof 1), "min", "max"}}}}`` for
    every condition at least two seeds have. ``cells``: model -> condition -> ``aggregate`` output. The bootstrap
    CIs of a cell measure question sampling; the spread across seeds measures training noise."""
    families: dict[str, dict[str, str]] = {}
    for name in cells:
        if SEED_SEP in name:
            family, label = name.split(SEED_SEP, 1)
            families.setdefault(family, {})[label] = name
    out: dict[str, dict] = {}
    for family, members in families.items():
        conditions = sorted({c for name in members.values() for c in cells[name]})
        for c in conditions:
            have = {label: cells[name][c] for label, name in sorted(members.items()) if c in cells[name]}
            if len(have) < 2:
                continue
            entry: dict[str, Any] = {"n_seeds": len(have), "seeds": list(have)}
            for m in metrics:
                vals = {label: a.get(m) for label, a in have.items()}
                finite = np.array([v for v in vals.values() if v is not None and np.isfinite(v)], dtype=float)
                entry[m] = {"per_seed": vals,
                            "mean": float(finite.mean()) if len(finite) else None,
                            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else None,
                            "min": float(finite.min()) if len(finite) else None,
                            "max": float(finite.max()) if len(finite) else None}
            out.setdefault(family, {})[c] = entry
    return out


def matrix_metrics(predictions: Mapping[tuple[str, str], pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> dict:
    """The statistics of an evaluation matrix. ``predictions``: (model, condition) -> prediction rows (question_id,
    true_answer, predicted_answer, answer_type, ...; condition 'swapped' with swap_match), model-major. Returns
    ``{"cells": {model: {condition: aggregate + abstention_rate}}, "image_reliance": {model: ...} (models with
    true and swapped), "vs_true": {model: {condition: condition_vs_true}} (each of ``PAIRED_CONDITIONS`` a model
    has beside true), "medhalt_abstention": {model: ...}, "paired_true": {"<b>_vs_<a>": paired_tests} (every pair
    of models on true, paired by question_id), "seeds": seed_summary}``."""
    scored = {key: score_rows(df) for key, df in predictions.items()}
    res: dict[str, Any] = {"cells": {}, "image_reliance": {}, "vs_true": {}, "medhalt_abstention": {},
                           "paired_true": {}}
    for (m, c), df in scored.items():
        cell = aggregate(df, n_boot=n_boot, seed=seed)
        cell["abstention_rate"] = abstention_rate(df["predicted_answer"], n_boot=n_boot, seed=seed)
        res["cells"].setdefault(m, {})[c] = cell
        if c == "medhalt":
            res["medhalt_abstention"][m] = cell["abstention_rate"]
        if c == "swapped":
            cell["swap_match"] = {str(k): int(v) for k, v in df["swap_match"].value_counts().items()}
    models = list(dict.fromkeys(m for m, _ in scored))
    for m in models:
        if (m, "true") in scored and (m, "swapped") in scored:
            res["image_reliance"][m] = image_reliance(scored[m, "true"], scored[m, "swapped"], n_boot, seed)
        for c in PAIRED_CONDITIONS:
            if (m, "true") in scored and (m, c) in scored:
                res["vs_true"].setdefault(m, {})[c] = condition_vs_true(scored[m, "true"], scored[m, c], n_boot, seed)
    with_true = [m for m in models if (m, "true") in scored]
    for a, b in combinations(with_true, 2):
        ta = _by_question(scored[a, "true"])
        res["paired_true"][f"{b}_vs_{a}"] = paired_tests(ta, _by_question(scored[b, "true"], ta.index), n_boot, seed)
    res["seeds"] = seed_summary(res["cells"])
    return res
