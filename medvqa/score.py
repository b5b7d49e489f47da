"""Score prediction files: load (JSON / JSON lines / CSV / parquet), score, compare two models, print a report.

    medvqa score preds.parquet                              # report table
    medvqa score preds.json --json                          # one JSON object
    medvqa score base.json --compare two_stage.json         # paired tests

Light and pure like ``medvqa.metrics``: no torch, no ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medvqa.metrics import METRICS, aggregate, json_ready, paired_tests, score_rows

__all__ = ["CANONICAL", "ALIASES", "load_predictions", "score_file", "compare_files", "format_report"]

#: canonical columns: the first three are required
CANONICAL = ("question", "true_answer", "predicted_answer", "answer_type", "question_type")
REQUIRED = ("true_answer", "predicted_answer")
#: accepted column names per canonical column, in order of preference (matched case-insensitively)
ALIASES: dict[str, tuple[str, ...]] = {
    "question": ("question", "questions", "query", "q", "prompt"),
    "true_answer": ("true_answer", "answer", "gt", "gt_answer", "ground_truth", "groundtruth", "reference",
                    "ref", "label", "target", "gold", "answers"),
    "predicted_answer": ("predicted_answer", "prediction", "predictions", "pred", "preds", "predicted",
                         "pred_answer", "model_answer", "output", "generated", "generation", "response", "text"),
    "answer_type": ("answer_type", "answer_types", "atype", "answer_kind"),
    "question_type": ("question_type", "question_types", "qtype", "q_type"),
}


class PredictionsError(ValueError):
    """A predictions file that cannot be read or lacks a needed column."""


def _read_any(path: Path) -> pd.DataFrame:
    """Read a table by suffix: .json (list of objects, {"rows"|"predictions"|"data"|"results": [...]}, or JSON
    lines), .jsonl/.ndjson, .csv, .tsv, .parquet/.pq, or a folder of parquet files (as Ray Data writes them)."""
    if not path.exists():
        raise PredictionsError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype=str)
    if suffix == ".tsv":
        return pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True, dtype=False)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return pd.read_json(path, lines=True, dtype=False)  # JSON lines under a .json name
        if isinstance(obj, dict):
            for key in ("rows", "predictions", "data", "results", "records"):
                if isinstance(obj.get(key), list):
                    obj = obj[key]
                    break
            else:
                raise PredictionsError(f"{path}: a JSON object without a list under rows/predictions/data/results")
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise PredictionsError(f"{path}: expected a JSON list of objects")
        return pd.DataFrame(obj)
    raise PredictionsError(f"{path}: unknown format {suffix!r} (use .json, .jsonl, .csv, .tsv or .parquet)")


def _resolve_columns(have: Sequence[str], columns: Mapping[str, str] | None, path: Path) -> dict[str, str]:
    """Map canonical name -> column in the file. ``columns`` may map canonical -> file column or file column ->
    canonical; explicit entries win over aliases."""
    explicit: dict[str, str] = {}
    for k, v in (columns or {}).items():
        if k in CANONICAL:
            explicit[k] = v
        elif v in CANONICAL:
            explicit[v] = k
        else:
            raise PredictionsError(f"columns mapping {k!r}: {v!r} names no canonical column {list(CANONICAL)}")
    for canon, src in explicit.items():
        if src not in have:
            raise PredictionsError(f"{path}: column {src!r} (given for {canon!r}) not in the file; it has {list(have)}")
    lower = {c.lower(): c for c in reversed(list(have))}
    used = set(explicit.values())
    mapping = dict(explicit)
    for canon in CANONICAL:
        if canon in mapping:
            continue
        for alias in ALIASES[canon]:
            src = lower.get(alias)
            if src is not None and src not in used:
                mapping[canon] = src
                used.add(src)
                break
    missing = [c for c in REQUIRED if c not in mapping]
    if missing:
        hints = "; ".join(f"{c!r} (looked for {', '.join(ALIASES[c])})" for c in missing)
        raise PredictionsError(f"{path}: missing column(s) {hints}; the file has {list(have)}. "
                               f"Map them with columns={{{', '.join(repr(c) + ': <name>' for c in missing)}}}")
    return mapping


def load_predictions(path: str | Path, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read a predictions table into the canonical columns ``question, true_answer, predicted_answer`` and, when
    found, ``answer_type, question_type`` (other columns are kept after them).

    Formats: JSON list of objects (or under a ``rows``/``predictions``/``data``/``results`` key), JSON lines,
    CSV/TSV, parquet (file or folder). Columns are found by common aliases (``answer``/``gt`` for the true answer,
    ``prediction``/``pred``/``output`` for the prediction, …, see ``ALIASES``); ``columns`` overrides, e.g.
    ``{"true_answer": "gold", "predicted_answer": "model_out"}``. Missing required columns raise
    ``PredictionsError`` naming them and the file's columns. A missing ``question`` column is filled with None.
    """
    path = Path(path)
    df = _read_any(path)
    mapping = _resolve_columns([str(c) for c in df.columns], columns, path)
    out = pd.DataFrame({canon: df[src].to_numpy(dtype=object) for canon, src in mapping.items()})
    if "question" not in out.columns:
        out["question"] = None
    for col in df.columns:
        if col not in mapping.values() and col not in out.columns:
            out[col] = df[col].to_numpy()
    first = [c for c in CANONICAL if c in out.columns]
    return out[first + [c for c in out.columns if c not in first]].reset_index(drop=True)


def score_file(path: str | Path, columns: Mapping[str, str] | None = None, n_boot: int = 1000, seed: int = 0,
               extract: bool = False, alpha: float = 0.05) -> dict:
    """Score one predictions file; one JSON-ready dict.

    Keys: ``source``, ``n``, ``n_closed``, ``n_open``, one per metric in ``medvqa.metrics.METRICS``
    (``paper_contains_em``, ``paper_f1``, ``paper_bleu1``, ``normalized_em``, ``normalized_f1``,
    ``closed_accuracy`` (closed rows), ``closed_accuracy_strict``, ``open_recall`` (open rows),
    ``open_recall_llava``, ``abstention``; fractions in [0, 1], None when no row qualifies), ``ci`` {metric:
    [lo, hi]} (percentile bootstrap, ``n_boot`` resamples, ``seed``), ``n_metric`` {metric: rows used},
    ``ci_level``, ``n_boot``, ``seed``, ``extract`` and ``breakdown`` {"answer_type": {"closed"|"open": …},
    "question_type": {…} when the file has it}. ``extract=True`` applies ``extract_answer`` to raw generations.
    """
    df = load_predictions(path, columns)
    res = aggregate(score_rows(df, extract=extract), n_boot=n_boot, seed=seed, alpha=alpha)
    return json_ready({"source": str(path), "extract": extract, **res})


def _check_aligned(a: pd.DataFrame, b: pd.DataFrame, pa: Path, pb: Path) -> None:
    if len(a) != len(b):
        raise PredictionsError(f"{pa} has {len(a)} rows but {pb} has {len(b)}: cannot pair them")

    def key(df: pd.DataFrame, i: int) -> tuple[str, str]:
        q, t = df.at[i, "question"], df.at[i, "true_answer"]
        norm = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else " ".join(str(x).split())
        return norm(q).lower(), norm(t).lower()

    for i in range(len(a)):
        if key(a, i) != key(b, i):
            raise PredictionsError(f"row {i} differs between {pa} and {pb}: {key(a, i)} vs {key(b, i)} — the files "
                                   "must hold the same questions and true answers in the same order")


def compare_files(a: str | Path, b: str | Path, columns: Mapping[str, str] | None = None,
                  columns_b: Mapping[str, str] | None = None, n_boot: int = 1000, seed: int = 0,
                  extract: bool = False, alpha: float = 0.05) -> dict:
    """Paired comparison of model B against model A on the same questions.

    Rows are paired by position and must agree on (question, true answer) — compared case- and
    whitespace-insensitively — else ``PredictionsError`` names the first row that differs. ``columns`` maps both
    files' columns unless ``columns_b`` is given for B. Returns ``{"n", "a": score of A, "b": score of B,
    "tests": metrics.paired_tests(A, B)}``.
    """
    pa, pb = Path(a), Path(b)
    da, db = load_predictions(pa, columns), load_predictions(pb, columns_b if columns_b is not None else columns)
    _check_aligned(da, db, pa, pb)
    sa, sb = score_rows(da, extract=extract), score_rows(db, extract=extract)
    tests = paired_tests(sa, sb, n_boot=n_boot, seed=seed, alpha=alpha)
    return json_ready({
        "n": len(sa), "n_boot": n_boot, "seed": seed, "ci_level": 1 - alpha,
        "a": {"source": str(pa), "extract": extract, **aggregate(sa, n_boot=n_boot, seed=seed, alpha=alpha)},
        "b": {"source": str(pb), "extract": extract, **aggregate(sb, n_boot=n_boot, seed=seed, alpha=alpha)},
        "tests": tests,
    })


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(pair: Sequence[Any] | None, digits: int = 3) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


#: short column headers for breakdown tables
_SHORT = {"paper_contains_em": "p_em", "paper_f1": "p_f1", "paper_bleu1": "p_bleu1", "normalized_em": "n_em",
          "normalized_f1": "n_f1", "closed_accuracy": "closed", "closed_accuracy_strict": "closed_strict",
          "open_recall": "open_rec", "open_recall_llava": "open_rec_llava", "abstention": "abstain"}


def _score_report(res: Mapping[str, Any]) -> str:
    level = int(round(100 * res.get("ci_level", 0.95)))
    out = [f"{res.get('source', 'predictions')}: n={res['n']} (closed {res['n_closed']}, open {res['n_open']})"]
    rows = [(m, _f(res.get(m)), _ci(res["ci"].get(m)), str(res["n_metric"].get(m, ""))) for m in METRICS if m in res]
    out.append(_table(("metric", "mean", f"{level}% CI", "n"), rows))
    for col, groups in res.get("breakdown", {}).items():
        shown = [m for m in METRICS if any(g.get(m) is not None for g in groups.values())]
        header = (col, "n", *[_SHORT.get(m, m) for m in shown])
        rows = [(name, str(g["n"]), *[_f(g.get(m)) for m in shown]) for name, g in groups.items()]
        out.append("")
        out.append(_table(header, rows))
    return "\n".join(out)


def _compare_report(res: Mapping[str, Any]) -> str:
    level = int(round(100 * res.get("ci_level", 0.95)))
    out = [f"A = {res['a']['source']}", f"B = {res['b']['source']}", f"n = {res['n']} paired questions", ""]
    rows = []
    for m, t in res["tests"].items():
        mc = t.get("mcnemar")
        rows.append((m, _f(t["mean_a"]), _f(t["mean_b"]), "—" if t["diff"] is None else f"{t['diff']:+.3f}",
                     _ci(t["ci"]), _f(t["p_value"]), "—" if mc is None else _f(mc["p_value"]), str(t["n"])))
    out.append(_table(("metric", "A", "B", "B−A", f"{level}% CI (B−A)", "p boot", "p McNemar", "n"), rows))
    return "\n".join(out)


def format_report(result: Mapping[str, Any]) -> str:
    """A plain-text table for ``score_file`` (metrics, CIs, breakdowns) or ``compare_files`` (paired tests) output."""
    return _compare_report(result) if "tests" in result else _score_report(result)
