"""Split leakage audit and image-disjoint splits (GUIDE §3 "Splits"): pure functions over lists of record dicts.

A record needs at least ``id``, ``image_id`` (sha1 of the image bytes, see ``records.validate_record``), ``prompt``
and ``split``; ``meta`` (a dict or a JSON object string) is read for stratification and for the dataset's own
linkage. No torch, no ray.

Two kinds of leak between a training side ``a`` and an evaluation side ``b``:

- **Image overlap** (``image_overlap``): evaluation questions whose image, by content hash, is also in training.
  In the official VQA-RAD split this is 446 of 451 test questions.
- **Near-duplicate questions** (``near_duplicate_questions``): an evaluation question that training also asks, after
  normalisation (``metrics.normalize_answer``: lower-case, punctuation and articles removed), or a rewrite of it.
  Matches are graded, strongest first:

  ``exact``      the normalised questions are equal;
  ``linked``     the dataset itself says one is an answer-preserving rewrite of the other (``linkage_groups``):
                 in VQA-RAD a question's templated frame (``question_frame``, written "to retain the answer",
                 e.g. "does this represent adequate inspiratory effort?" -> "Is/Are the lungs normal size?") and
                 its paraphrases in *strict agreement* (``qid_linked_id``, ``question_rephrase``), all about one
                 image. Frames share few words with their question, so no lexical rule finds most of them;
                 derived splits that add them to training drop the fields, and joining against the original
                 release (``reference``) recovers them;
  ``reordered``  same token multiset in another order;
  ``slot``       same length, the same tokens except in one slot (one position when the question has fewer than
                 ``SLOT2_MIN_TOKENS`` tokens, up to two otherwise), at least ``SLOT_MIN_SHARED`` tokens shared in
                 place, one of them a content word ("is this axial image" is not a rewrite of "is this ct image");
  ``content``    Jaccard >= ``CONTENT_JACCARD`` on *content words* (the tokens left after dropping function words
                 and question-template words such as "there", "seen", "image", "evidence"; wh-words, negations and
                 numbers are kept as content), non-empty.

  ``reordered``, ``slot`` and ``content`` are the *lexical* rewrites. Each is reported separately for pairs on the
  **same image** (the same question about the same image: the most serious leak, the answer is in training) and on
  **other images** (the same question asked about a different image: question-distribution overlap, informational).
  Exact and multiset matches are dict look-ups, slots are bucketed by masked-position keys, content Jaccard uses
  prefix filtering on rarest-first tokens, and same-image pairs are compared directly within each image's handful
  of questions, so the audit is ~linear in the data.

``image_disjoint_split`` (``medvqa.data.protocol``, re-exported here) assigns whole images to one side (seeded,
independent of input order, optionally stratified by a meta key such as ``organ``); its audit reports 0 image
overlap by construction. It is the ``image_disjoint`` protocol that training and evaluation use.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

from medvqa.data.protocol import image_disjoint_split  # noqa: F401 - re-exported: the audit's split
from medvqa.data.records import parse_meta
from medvqa.metrics import normalize_answer

__all__ = ["image_overlap", "near_duplicate_questions", "audit_splits", "image_disjoint_split", "format_audit",
           "question_tokens", "content_words", "match_kind", "linkage_groups", "KINDS", "LEXICAL_KINDS"]

KINDS = ("exact", "linked", "reordered", "slot", "content")  # strongest first
LEXICAL_KINDS = ("reordered", "slot", "content")
# Meta keys of the dataset's linkage (VQA-RAD's original release, kept by ``adapters.vqa_rad_original``).
LINK_GROUP, LINK_RELATION, LINK_STRICT = "qid_linked_id", "question_relation", "strict agreement"
CONTENT_JACCARD = 0.8
SLOT_MIN_SHARED = 3       # a slot match keeps at least this many tokens in place
SLOT2_MIN_TOKENS = 8      # two substituted slots only in questions at least this long
N_EXAMPLES = 10

# Function words and question-template words: dropped before the content-word Jaccard. Wh-words, negations
# ("no", "not", "without") and numbers stay content: "where is the mass" is not "is there a mass".
_TEMPLATE_WORDS = frozenset("""
    a an the this that these those it its is are was were be been being am do does did done can could would should
    will shall may might must has have had there here of in on at to for with by from into onto within as and or
    if any some s image images picture pictures photo film study scan shown show shows showing seen see seeing
    visible visualized visualised noted note present presence evidence evident demonstrated demonstrate depicted
    observed appear appears appearing identified identify found detected displayed patient patients you we one
    please tell me us kind type sort
""".split())


# ----------------------------------------------------------------------------------------------------------------
# Question normal forms
# ----------------------------------------------------------------------------------------------------------------

def question_tokens(text: Any) -> tuple[str, ...]:
    """Normalised tokens of a question (``metrics.normalize_answer``)."""
    return tuple(normalize_answer(text).split())


def content_words(tokens: Iterable[str]) -> frozenset[str]:
    """The content words of normalised tokens (function/template words dropped)."""
    return frozenset(t for t in tokens if t not in _TEMPLATE_WORDS)


def _jaccard(a: frozenset, b: frozenset) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _slot_limit(n: int) -> int:
    return 2 if n >= SLOT2_MIN_TOKENS else 1


def _slot_match(a: Sequence[str], b: Sequence[str]) -> bool:
    if len(a) != len(b) or not a:
        return False
    shared = [x for x, y in zip(a, b) if x == y]
    diff = len(a) - len(shared)
    return (0 < diff <= _slot_limit(len(a)) and len(shared) >= SLOT_MIN_SHARED
            and any(t not in _TEMPLATE_WORDS for t in shared))


def match_kind(q1: Any, q2: Any) -> str | None:
    """The strongest kind of near-duplicate between two questions (``KINDS``), or None when they are different."""
    return _kind(_Form.of(q1), _Form.of(q2))


class _Form:
    __slots__ = ("norm", "tokens", "bag", "content")

    def __init__(self, tokens: tuple[str, ...]):
        self.tokens = tokens
        self.norm = " ".join(tokens)
        self.bag = tuple(sorted(tokens))
        self.content = content_words(tokens)

    @classmethod
    def of(cls, text: Any) -> _Form:
        return cls(question_tokens(text))


def _kind(f1: _Form, f2: _Form) -> str | None:
    if not f1.tokens or not f2.tokens:
        return None
    if f1.norm == f2.norm:
        return "exact"
    if f1.bag == f2.bag:
        return "reordered"
    if _slot_match(f1.tokens, f2.tokens):
        return "slot"
    if _jaccard(f1.content, f2.content) >= CONTENT_JACCARD:
        return "content"
    return None


def _slot_keys(tokens: tuple[str, ...]) -> list[tuple]:
    """Keys shared by two equal-length token sequences iff they agree outside some set of masked positions of the
    allowed size (1, or 2 for long questions); the shared-token minimum is checked on the candidates."""
    n = len(tokens)
    if n < SLOT_MIN_SHARED + 1:
        return []
    k = _slot_limit(n)
    return [tuple("\0" if i in mask else t for i, t in enumerate(tokens)) for mask in combinations(range(n), k)]


# ----------------------------------------------------------------------------------------------------------------
# The dataset's own linkage
# ----------------------------------------------------------------------------------------------------------------

def _image_keys(row: dict) -> list[str]:
    """A record's image by content hash and by file name: a derived split that re-encoded the images still joins
    its original by name, one that renamed them by hash."""
    return [f"{kind}:{row[key]}" for kind, key in (("hash", "image_id"), ("name", "image_name")) if row.get(key)]


def _link(row: dict) -> tuple[str, list] | None:
    """(group, texts the group links on the row's image) of a record with linkage meta, else None.

    A paraphrase pair joins its ``qid_linked_id`` group only in strict agreement (VQA-RAD's Readme: same question
    and answer format; 2 of its 569 strict pairs differ in answer). Loosely linked pairs (subsumption, inversion,
    conversion, not similar, unlabelled) share a topic, not an answer (111 of 195 pairs differ), so such a record
    is a group of its own, with its question and its frame, which keeps the answer by construction."""
    meta = parse_meta(row.get("meta"))
    group = meta.get(LINK_GROUP)
    if not group:
        return None
    if str(meta.get(LINK_RELATION) or "").strip().lower() == LINK_STRICT:
        return str(group), [row.get("prompt"), meta.get("question_frame"), meta.get("question_rephrase")]
    return f"{group}#{row.get('id')}", [row.get("prompt"), meta.get("question_frame")]


def linkage_groups(rows: Sequence[dict], reference: Sequence[dict] = ()) -> list[frozenset[str]]:
    """Per row, the linkage groups it belongs to (see ``_link``); empty without linkage.

    A record with linkage meta belongs to its own group. Every record with linkage, in ``rows`` and in
    ``reference`` (the original release, for rows of a derived split that dropped the fields), also lends its group
    to the texts it links on its image (its question, its frame, in strict agreement its rephrasing). A row then
    belongs to the group of every such text equal to its normalised question on the same image (by content hash
    or file name). So a frame added to training as a record of its own, on its question's image, falls into its
    question's group, with or without fields of its own."""
    index: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in (*reference, *rows):
        link = _link(row)
        if link is None:
            continue
        group, texts = link
        for key in _image_keys(row):
            for text in {" ".join(question_tokens(t)) for t in texts} - {""}:
                index[(key, text)].add(group)
    out = []
    for row in rows:
        link = _link(row)
        groups = {link[0]} if link else set()
        text = " ".join(question_tokens(row.get("prompt")))
        for key in _image_keys(row):
            groups |= index.get((key, text), set())
        out.append(frozenset(groups))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Audits
# ----------------------------------------------------------------------------------------------------------------

def _pct(num: int, den: int) -> float:
    return num / den if den else 0.0


def image_overlap(train_rows: Sequence[dict], test_rows: Sequence[dict], n_examples: int = N_EXAMPLES) -> dict:
    """Test questions whose image (by content hash ``image_id``) also appears in train. Rows without an image_id
    (no image) cannot overlap and are counted apart (``no_image``)."""
    train_images = {r.get("image_id") for r in train_rows if r.get("image_id")}
    test_with = [r for r in test_rows if r.get("image_id")]
    hit = [r for r in test_with if r["image_id"] in train_images]
    test_images = {r["image_id"] for r in test_with}
    shared = test_images & train_images
    return {
        "questions": len(hit), "total_questions": len(test_rows), "fraction": _pct(len(hit), len(test_rows)),
        "unique_images": len(shared), "test_images": len(test_images), "train_images": len(train_images),
        "image_fraction": _pct(len(shared), len(test_images)),
        "no_image": len(test_rows) - len(test_with),
        "example_ids": [str(r.get("id")) for r in hit[:n_examples]],
        "clean_ids": [str(r.get("id")) for r in test_with if r["image_id"] not in train_images][:n_examples],
    }


def _empty_side() -> dict:
    return {"questions": 0, "fraction": 0.0, "exact": 0, "linked": 0, "lexical": 0, "rewrite": 0,
            "by_kind": {k: 0 for k in KINDS}, "examples": []}


def near_duplicate_questions(train_rows: Sequence[dict], test_rows: Sequence[dict],
                             n_examples: int = N_EXAMPLES, reference: Sequence[dict] = ()) -> dict:
    """Test questions that train also asks (normalised) or a rewrite of (see the module doc), split into
    ``same_image`` (a train near-duplicate on the same image, by content hash) and ``cross_image`` (one on another
    image). Each test question is counted once per side, under its strongest kind; ``exact``, ``linked`` and
    ``lexical`` (reordered + slot + content) add up to ``questions``, ``rewrite`` is linked + lexical. Examples are
    (test, train) pairs; ``same_image["flagged"]`` lists every same-image hit. ``reference``: records of the
    original release carrying the linkage (see ``linkage_groups``); ``linkage`` says how many rows have any."""
    tr_forms = [_Form.of(r.get("prompt")) for r in train_rows]
    te_forms = [_Form.of(r.get("prompt")) for r in test_rows]
    tr_img = [r.get("image_id") or "" for r in train_rows]
    groups = linkage_groups([*train_rows, *test_rows], reference)
    tr_groups, te_groups = groups[:len(train_rows)], groups[len(train_rows):]
    group_ix: dict[str, list[int]] = defaultdict(list)
    for i, gs in enumerate(tr_groups):
        for g in gs:
            group_ix[g].append(i)

    # Same image: every train/test pair of each image, directly (a handful of questions per image).
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, img in enumerate(tr_img):
        if img:
            by_image[img].append(i)

    # Other images: bucketed indices; each maps a key -> {image_id: first train index}.
    exact_ix: dict[str, dict[str, int]] = defaultdict(dict)
    bag_ix: dict[tuple, dict[str, int]] = defaultdict(dict)
    slot_ix: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(tr_forms):
        if not f.tokens:
            continue
        exact_ix[f.norm].setdefault(tr_img[i], i)
        bag_ix[f.bag].setdefault(tr_img[i], i)
        for key in _slot_keys(f.tokens):
            slot_ix[key].append(i)
    # Content Jaccard: prefix filtering. Tokens ordered rarest first (ties by text); two sets with Jaccard >= t
    # share a token within the first |x| - ceil(t*|x|) + 1 tokens of each.
    freq = Counter(t for f in tr_forms + te_forms for t in f.content)

    def ordered(f: _Form) -> list[str]:
        return sorted(f.content, key=lambda t: (freq[t], t))

    def prefix(f: _Form) -> list[str]:
        toks = ordered(f)
        return toks[:len(toks) - math.ceil(CONTENT_JACCARD * len(toks) - 1e-9) + 1] if toks else []

    content_ix: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(tr_forms):
        for t in prefix(f):
            content_ix[t].append(i)

    def other_image(d: dict[str, int], img: str) -> int | None:
        for key, i in d.items():
            if key != img or not img:
                return i
        return None

    def cross_match(f: _Form, img: str, gs: frozenset[str]) -> tuple[str, int] | None:
        if not f.tokens:
            return None
        i = other_image(exact_ix.get(f.norm, {}), img)
        if i is not None:
            return "exact", i
        linked = [i for g in gs for i in group_ix[g] if tr_img[i] != img or not img]
        if linked:
            return "linked", min(linked)
        i = other_image(bag_ix.get(f.bag, {}), img)
        if i is not None:
            return "reordered", i
        best = None
        for key in _slot_keys(f.tokens):
            for i in slot_ix.get(key, ()):
                if (tr_img[i] != img or not img) and _slot_match(f.tokens, tr_forms[i].tokens):
                    best = i if best is None else min(best, i)
        if best is not None:
            return "slot", best
        seen: set[int] = set()
        for t in prefix(f):
            for i in content_ix.get(t, ()):
                if i in seen:
                    continue
                seen.add(i)
                if (tr_img[i] != img or not img) and _jaccard(f.content, tr_forms[i].content) >= CONTENT_JACCARD:
                    best = i if best is None else min(best, i)
        return ("content", best) if best is not None else None

    def same_match(f: _Form, img: str, gs: frozenset[str]) -> tuple[str, int] | None:
        found = None
        for i in by_image.get(img, ()) if img else ():
            kind = _kind(f, tr_forms[i])
            if kind != "exact" and gs & tr_groups[i]:
                kind = "linked"
            if kind and (found is None or KINDS.index(kind) < KINDS.index(found[0])):
                found = (kind, i)
        return found

    result = {"n_train": len(train_rows), "n_test": len(test_rows),
              "same_image": {**_empty_side(), "flagged": []}, "cross_image": _empty_side(),
              "linkage": {"train_rows": sum(map(bool, tr_groups)), "test_rows": sum(map(bool, te_groups)),
                          "reference_rows": len(reference)}}
    for j, (row, f) in enumerate(zip(test_rows, te_forms)):
        img, gs = row.get("image_id") or "", te_groups[j]
        for side, found in (("same_image", same_match(f, img, gs)), ("cross_image", cross_match(f, img, gs))):
            if not found:
                continue
            kind, i = found
            out = result[side]
            out["questions"] += 1
            out["by_kind"][kind] += 1
            out["lexical" if kind in LEXICAL_KINDS else kind] += 1
            out["rewrite"] += kind != "exact"
            pair = {"kind": kind, "test_id": str(row.get("id")), "train_id": str(train_rows[i].get("id")),
                    "test_prompt": row.get("prompt"), "train_prompt": train_rows[i].get("prompt")}
            if side == "same_image":
                out["flagged"].append(pair)
            if len(out["examples"]) < n_examples and (kind != "exact" or side == "same_image"):
                out["examples"].append(pair)
    for side in ("same_image", "cross_image"):
        result[side]["fraction"] = _pct(result[side]["questions"], len(test_rows))
    result["method"] = (f"normalize_answer tokens; exact, linked (the dataset's qid_linked_id / question_frame / "
                        f"question_rephrase), reordered (same multiset), slot (same length, <= "
                        f"{_slot_limit(SLOT2_MIN_TOKENS - 1)} differing token, <= {_slot_limit(SLOT2_MIN_TOKENS)} "
                        f"from {SLOT2_MIN_TOKENS} tokens, >= {SLOT_MIN_SHARED} shared incl. a content word), content-word Jaccard >= "
                        f"{CONTENT_JACCARD}")
    return result


def audit_splits(rows_a: Sequence[dict], rows_b: Sequence[dict], name_a: str = "train",
                 name_b: str = "test", reference: Sequence[dict] = ()) -> dict:
    """Image overlap and near-duplicate questions of ``rows_b`` (evaluation side) against ``rows_a`` (training
    side), with a one-sentence ``statement``. ``reference``: the original release's records, for the linkage a
    derived split dropped (``linkage_groups``)."""
    ov = image_overlap(rows_a, rows_b)
    nd = near_duplicate_questions(rows_a, rows_b, reference=reference)
    same, cross = nd["same_image"], nd["cross_image"]
    linked = (f"{same['linked']} linked rewrites" if nd["linkage"]["train_rows"] or nd["linkage"]["test_rows"]
              else "linked rewrites not checked: no linkage in the data")
    statement = (f"{ov['questions']} of {ov['total_questions']} {name_b} questions ({100 * ov['fraction']:.1f}%) "
                 f"have their image in {name_a} (by content hash); {same['questions']} near-duplicate questions on "
                 f"the same image ({same['exact']} exact, {linked}, {same['lexical']} lexical rewrites); "
                 f"{cross['questions']} have a near-duplicate on another image.")
    return {"names": {"a": name_a, "b": name_b}, "sizes": {name_a: len(rows_a), name_b: len(rows_b)},
            "image_overlap": ov, "near_duplicates": nd, "statement": statement}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def format_audit(result: dict) -> str:
    """A human-readable report of ``audit_splits``."""
    a, b = result["names"]["a"], result["names"]["b"]
    ov, nd = result["image_overlap"], result["near_duplicates"]
    lines = [f"Split audit: {a} ({result['sizes'][a]} questions) vs {b} ({result['sizes'][b]} questions)", "",
             result["statement"], "",
             "Image overlap (by content hash)",
             (f"  {b} questions with their image in {a}: {ov['questions']} of {ov['total_questions']} "
              f"({100 * ov['fraction']:.1f}%)"),
             (f"  shared images: {ov['unique_images']} of {ov['test_images']} {b} images "
              f"({100 * ov['image_fraction']:.1f}%); {a} has {ov['train_images']} images")]
    if ov["no_image"]:
        lines.append(f"  {b} questions without an image (not checked): {ov['no_image']}")
    if ov["example_ids"]:
        lines.append(f"  e.g. ids: {', '.join(ov['example_ids'])}")
    link = nd["linkage"]
    lines += ["", f"Near-duplicate questions ({nd['method']})",
              (f"  dataset linkage (paraphrases, frames) on {link['train_rows']} {a} and {link['test_rows']} {b} "
               f"questions" + (f", joined against {link['reference_rows']} reference records"
                               if link["reference_rows"] else ""))]
    for side, title in (("same_image", "on the same image (answer leaked)"),
                        ("cross_image", "on another image (question overlap)")):
        s = nd[side]
        kinds = ", ".join(f"{k} {s['by_kind'][k]}" for k in KINDS)
        lines.append(f"  {title}: {s['questions']} of {nd['n_test']} ({100 * s['fraction']:.1f}%) [{kinds}]")
        for ex in s["flagged"][:10] if side == "same_image" else s["examples"][:5]:
            lines.append(f"    {ex['kind']:9s} {b} {ex['test_id']}: {ex['test_prompt']!r}  ~  "
                         f"{a} {ex['train_id']}: {ex['train_prompt']!r}")
    return "\n".join(lines)
