"""A run's report (``RUN_DIR/report/report.md`` + ``report.html`` + PNG plots) from ``RUN_DIR/eval/metrics.json``,
and the clinician (human) evaluation round trip.

* ``build_report(run_dir)``: the Figure-2 style table (model × condition, study metrics and standard ones, each
  "mean [lo, hi]"), breakdowns by answer / question type, image reliance (true → swapped drop), Med-HALT
  abstention, paired tests between models, the leakage statement, provenance (run id, config.yaml, git commit,
  generation time), the training curves of every stage (the study's Figure 4: loss and lr per step, validation
  metrics per round, from ``metrics.jsonl``), the cost of every stage and of every matrix cell, and -- once merged --
  the human-evaluation table. The HTML is self-contained except for the PNGs, referenced by relative path
  (``plots/*.png``).
* ``export_human_eval(run_dir, out_csv)``: the open (non-yes/no) questions of every cell, with an empty
  ``clinician_score`` column; ``merge_human_eval(run_dir, filled_csv)`` validates a filled copy and stores it as
  ``RUN_DIR/report/human_eval.csv`` for the report.

No Ray, no torch: pandas, pyarrow and matplotlib (Agg) only.
"""

from __future__ import annotations

import html
import io
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvqa.config import dump_yaml, to_dict
from medvqa.runs import RunDir
from medvqa.storage import StoragePath, staged

log = logging.getLogger(__name__)

#: Figure-2 columns: the study's metrics, then the standard ones
STUDY_METRICS = ("paper_contains_em", "paper_f1", "paper_bleu1")
STANDARD_METRICS = ("normalized_em", "normalized_f1", "closed_accuracy", "open_recall")
TABLE_METRICS = STUDY_METRICS + STANDARD_METRICS
#: metrics in the bar chart
PLOT_METRICS = ("paper_contains_em", "normalized_f1", "closed_accuracy", "open_recall")
#: clinician scores accepted by ``merge_human_eval``
HUMAN_SCORES = (0, 1, 2, 3, 4, 5)
HUMAN_COLUMNS = ("model", "condition", "question_id", "question", "true_answer", "predicted_answer",
                 "image_id_shown", "image_path", "clinician_score")
#: conditions left out of the human export by default (Med-HALT: the right answer is to decline)
HUMAN_SKIP_CONDITIONS = ("medhalt",)


class HumanEvalError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------ formatting


def fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def fmt_ci(mean: Any, ci: Sequence[Any] | None, digits: int = 3) -> str:
    """'0.552 [0.505, 0.600]' ('—' when undefined)."""
    if mean is None:
        return "—"
    if not ci or ci[0] is None or ci[1] is None:
        return fmt(mean, digits)
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _signed_ci(d: Any, ci: Sequence[Any] | None) -> str:
    if d is None:
        return "—"
    s = f"{d:+.3f}"
    if ci and ci[0] is not None:
        s += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return s


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ loading


def load_metrics(run_dir: str | os.PathLike) -> dict:
    rd = RunDir(run_dir)
    if not rd.eval_metrics.exists():
        raise FileNotFoundError(f"{rd.eval_metrics}: no evaluation metrics (run `medvqa eval {run_dir}` first)")
    return rd.read_json(rd.eval_metrics)


def _cells(metrics: Mapping) -> list[tuple[str, str, dict]]:
    """(model, condition, aggregate) in the settings' order where known."""
    settings = metrics.get("settings") or {}
    cond_order = list(settings.get("conditions") or [])
    out = []
    for m, conds in (metrics.get("cells") or {}).items():
        names = sorted(conds, key=lambda c: (cond_order.index(c) if c in cond_order else len(cond_order), c))
        out += [(m, c, conds[c]) for c in names]
    return out


# ------------------------------------------------------------------------------------------------ sections


def figure2_rows(metrics: Mapping) -> list[list[str]]:
    return [[m, c, str(a.get("n", "")), *[fmt_ci(a.get(k), (a.get("ci") or {}).get(k)) for k in TABLE_METRICS]]
            for m, c, a in _cells(metrics)]


FIG2_HEADER = ("model", "condition", "n", *TABLE_METRICS)


def breakdown_tables(metrics: Mapping) -> dict[str, tuple[list[str], list[list[str]]]]:
    """column ('answer_type', 'question_type') -> (header, rows of model, condition, group, n, metrics)."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    for m, c, a in _cells(metrics):
        for col, groups in (a.get("breakdown") or {}).items():
            header, rows = out.setdefault(col, (["model", "condition", col, "n", *TABLE_METRICS], []))
            for g, s in groups.items():
                rows.append([m, c, g, str(s.get("n", "")),
                             *[fmt_ci(s.get(k), (s.get("ci") or {}).get(k)) for k in TABLE_METRICS]])
    return out


#: what each condition measures (the report's Conditions section)
CONDITION_DOCS = {
    "true": "the test questions on their own images",
    "swapped": "each question on another test image (same modality and organ when known): the drop from true is "
               "image reliance",
    "blank": "each question on a uniform mid-gray image of its image's size: what the model answers from the text "
             "alone",
    "expert": "the expert-radiologist instruction instead of the trained one",
    "few_shot": "solved examples from the training side (never the test side, never the question's image) as earlier "
                "chat turns before each question",
    "medhalt": "Med-HALT nonsense questions on random test images: declining is right",
    "ood": "an out-of-distribution set (PathVQA, or for a phantom run ultrasound phantoms, a modality never trained "
           "on)",
}


def vs_true_rows(metrics: Mapping) -> list[list[str]]:
    """Each condition against true, question by question (``metrics.condition_vs_true``)."""
    rows = []
    for model, per in (metrics.get("vs_true") or {}).items():
        for c, by_metric in per.items():
            for k, r in by_metric.items():
                rows.append([model, c, k, fmt(r.get("true")), fmt(r.get("condition")),
                             _signed_ci(r.get("diff"), r.get("ci")), fmt(r.get("p_value")), str(r.get("n", ""))])
    return rows


def skipped_rows(metrics: Mapping) -> list[list[str]]:
    return [[s.get("model", "*"), s.get("condition", "*"), s.get("reason", "")]
            for s in metrics.get("skipped_cells") or []]


def rejects_rows(run_dir: str | os.PathLike, metrics: Mapping) -> list[list[str]]:
    """Every data source of the run with its records kept and rejected, the reasons and the file listing them:
    training's stages (``manifest.json``) and the evaluation's sources (``settings.sources``)."""
    rd = RunDir(run_dir)
    manifest = rd.read_json(rd.manifest, default={})
    reasons = lambda r: ", ".join(f"{k} {v}" for k, v in (r or {}).items()) or "—"
    rows = [[f"training: {stage}", f"{m.get('source', '')} {m.get('split', '')} ({m.get('protocol', 'official')})",
             str(m.get("valid", "")), str(m.get("rejected", "")), reasons(m.get("reject_reasons")),
             str(m["rejects_file"]).removeprefix(f"{rd.path}/") if m.get("rejects_file") else "—"]
            for stage, m in manifest.items()]
    for name, src in ((metrics.get("settings") or {}).get("sources") or {}).items():
        skipped = f" (skipped: {src['too_many']})" if src.get("too_many") else ""
        rows.append([f"evaluation: {name}", src.get("what", ""), str(src.get("valid", "")),
                     str(src.get("rejected", "")), reasons(src.get("reject_reasons")) + skipped,
                     f"eval/{src['rejects_file']}" if src.get("rejects_file") else "—"])
    return rows


def reliance_rows(metrics: Mapping) -> list[list[str]]:
    rows = []
    for model, per in (metrics.get("image_reliance") or {}).items():
        for k, r in per.items():
            rows.append([model, k, fmt(r.get("true")), fmt(r.get("swapped")), _signed_ci(r.get("drop"), r.get("ci")),
                         fmt(r.get("p_value")), str(r.get("n", ""))])
    return rows


def abstention_rows(metrics: Mapping) -> list[list[str]]:
    """Med-HALT abstention (the headline) plus every cell's decline rate."""
    rows = []
    for m, c, a in _cells(metrics):
        ab = a.get("abstention_rate") or {}
        if ab:
            rows.append([m, c, fmt_ci(ab.get("decline_rate"), (ab.get("ci") or {}).get("decline_rate")),
                         f"{ab.get('n_declined', '')} / {ab.get('n', '')}"])
    return rows


def paired_rows(metrics: Mapping) -> list[list[str]]:
    rows = []
    for name, tests in (metrics.get("paired_true") or {}).items():
        for k, b in tests.items():
            mc = b.get("mcnemar")
            rows.append([name, k, fmt(b.get("mean_a")), fmt(b.get("mean_b")), _signed_ci(b.get("diff"), b.get("ci")),
                         fmt(b.get("p_value")), fmt(mc.get("p_value")) if mc else "—", str(b.get("n", ""))])
    return rows


def seed_rows(metrics: Mapping, keys: Sequence[str] = TABLE_METRICS) -> list[list[str]]:
    """Models run with several seeds: per condition, 'mean ± sd [min, max]' across seeds per metric, then each
    seed's value."""
    rows = []
    for family, conds in (metrics.get("seeds") or {}).items():
        for c, e in conds.items():
            cells = []
            for k in keys:
                v = e.get(k) or {}
                cells.append("—" if v.get("mean") is None else
                             f"{v['mean']:.3f} ± {fmt(v.get('sd'))} [{fmt(v.get('min'))}, {fmt(v.get('max'))}]")
            rows.append([family, c, str(e.get("n_seeds", "")), "mean ± sd [min, max]", *cells])
            for seed in e.get("seeds") or []:
                rows.append([family, c, "", f"seed {seed}",
                             *[fmt(((e.get(k) or {}).get("per_seed") or {}).get(seed)) for k in keys]])
    return rows


def leakage_section(run_dir: str | os.PathLike, audit: bool = True, metrics: Mapping | None = None) -> dict:
    """{'kind', 'protocol', 'statement', 'audit' (audit_splits output or None), 'measured' (lines)}: the protocol the
    run trained with (``stage2.data.protocol``); the audit of its training side against its test side (image overlap
    by content hash, near-duplicate questions), for every VQA source and phantoms; and, from ``metrics`` (the
    evaluation's ``settings.leakage``), how many images of the evaluated test set each fine-tuned model trained on.
    Never raises."""
    import dataclasses

    rd = RunDir(run_dir)
    if not rd.config.exists():
        return {"kind": "unknown", "protocol": None, "audit": None, "measured": [],
                "statement": "No config.yaml: the data and protocol are unknown."}
    data = rd.read_config().stage2.data
    out: dict[str, Any] = {"kind": data.kind, "protocol": data.protocol, "audit": None,
                           "measured": measured_leakage(metrics or {})}
    from medvqa.data.protocol import POOLED_SPLITS, describe, protocol_records

    if data.kind not in POOLED_SPLITS and data.kind != "phantom":
        out["statement"] = (f"stage-2 source {data.kind!r} at {data.path!r}: no leakage audit for this source.")
        return out
    try:
        what = describe(data)
        if not audit:
            out["statement"] = f"Protocol: {what}. Leakage audit not computed (disabled)."
            return out
        from medvqa.audit import audit_splits

        sides = [protocol_records(dataclasses.replace(data, split=side, limit=None, validation_fraction=0.0),
                                  keep_images=False)[0] for side in ("train", "test")]
        res = audit_splits(*sides)
        out["audit"] = res
        out["statement"] = (f"Protocol: {what}. Shared images between the training and the test side: "
                            f"{res['image_overlap']['unique_images']}. {res['statement']}")
    except Exception as e:  # the data may be gone; say so instead of omitting the section
        out["statement"] = (f"{data.kind} at {data.path!r} ({data.protocol} protocol): the train/test leakage audit "
                            f"could not be computed ({type(e).__name__}: {e}). Run `medvqa data audit --kind "
                            f"{data.kind} --path ...`.")
    return out


def measured_leakage(metrics: Mapping) -> list[str]:
    """Lines saying, per fine-tuned model, how many images of the evaluated test set it trained on (the
    evaluation's ``settings.leakage``), and why the comparison is not meaningful when one did."""
    lk = (metrics.get("settings") or {}).get("leakage") or {}
    if not lk:
        return []
    lines = []
    for model, v in (lk.get("per_model") or {}).items():
        if v.get("shared_images") is None:
            lines.append(f"{model}: not measured (its prepared training records are gone).")
        else:
            lines.append(f"{model} trained on {v['shared_images']} of the {v['test_images']} images of the evaluated "
                         f"test set ({v['questions']} of {v['n_questions']} questions).")
    head = (f"Measured on the evaluated test set ({lk.get('protocol_test')} protocol; the run trained with the "
            f"{lk.get('protocol_trained')} one):")
    tail = [] if lk.get("meaningful", True) else [f"NOT A CLEAN TEST: {lk.get('why')}."]
    return [head, *lines, *tail] if lines else tail


def provenance(run_dir: str | os.PathLike) -> dict:
    rd = RunDir(run_dir)
    env = rd.read_json(rd.environment, default={})
    git = env.get("git") or {}
    return {"run_id": rd.name, "run_dir": str(rd),
            "git_commit": git.get("commit") or "unknown", "git_dirty": git.get("dirty"),
            "environment_time": env.get("time"), "packages": env.get("packages") or {},
            "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
            "config_path": f"../{rd.config.name}",  # the report sits in RUN_DIR/report/
            "config_text": dump_yaml(rd.read_config()) if rd.config.exists() else ""}


# ------------------------------------------------------------------------------------------------ plots


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics: Mapping, path: Path, keys: Sequence[str] = PLOT_METRICS) -> Path | None:
    """Grouped bars: one group per metric, one bar per model × condition, 95% CI error bars."""
    cells = _cells(metrics)
    if not cells:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) + 0.25 * len(cells) * len(keys)), 4.2))
    width = 0.8 / len(cells)
    x = np.arange(len(keys))
    for i, (m, c, a) in enumerate(cells):
        vals = np.array([a.get(k) if a.get(k) is not None else np.nan for k in keys], float)
        lo = np.array([((a.get("ci") or {}).get(k) or [None, None])[0] for k in keys], float)
        hi = np.array([((a.get("ci") or {}).get(k) or [None, None])[1] for k in keys], float)
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
        ax.bar(x - 0.4 + (i + 0.5) * width, np.nan_to_num(vals), width, yerr=err, capsize=2, label=f"{m} / {c}")
    ax.set_xticks(x)
    ax.set_xticklabels(keys, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% CI)")
    ax.legend(fontsize=7, ncol=min(4, len(cells)), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_forest(metrics: Mapping, path: Path) -> Path | None:
    """Forest plot of the paired differences (B − A on the true condition) and the image-reliance drops."""
    items = []
    for name, tests in (metrics.get("paired_true") or {}).items():
        for k, b in tests.items():
            if k in TABLE_METRICS and b.get("diff") is not None:
                items.append((f"{name}: {k}", b["diff"], b.get("ci") or [None, None]))
    for model, per in (metrics.get("image_reliance") or {}).items():
        for k, r in per.items():
            if r.get("drop") is not None:
                items.append((f"reliance {model}: {k}", r["drop"], r.get("ci") or [None, None]))
    if not items:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(items) + 1.2))
    y = np.arange(len(items))[::-1]
    d = np.array([v for _, v, _ in items], float)
    lo = np.array([c[0] if c[0] is not None else v for _, v, c in items], float)
    hi = np.array([c[1] if c[1] is not None else v for _, v, c in items], float)
    ax.errorbar(d, y, xerr=np.vstack([d - lo, hi - d]).clip(min=0), fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels([n for n, _, _ in items], fontsize=7)
    ax.set_xlabel("difference (95% paired-bootstrap CI)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ training and cost

#: validation metrics drawn in the curves (the rest are in the table)
CURVE_VAL_METRICS = ("val_normalized_em", "val_normalized_f1", "val_closed_accuracy", "val_open_recall")


def training_log(run_dir: str | os.PathLike) -> dict[str, dict[str, list[dict]]]:
    """stage -> {'steps': step rows, 'validation': rows, 'resumed' / 'start' / 'end': those events, 'times': the
    ``time`` of every record, interrupted attempts' too (their cost is real)} from ``metrics.jsonl``, in file order.
    Steps and validation rounds are kept once, the last row written winning (a resumed stage repeats the steps after
    its checkpoint; the repeat is what the model finally trained on)."""
    from medvqa.runs import read_metrics

    out: dict[str, dict[str, Any]] = {}
    for r in read_metrics(run_dir, superseded=True):
        stage, event = r.get("stage"), r.get("event")
        if not stage:
            continue
        log_ = out.setdefault(stage, {"steps": {}, "validation": {}, "resumed": [], "start": [], "end": [],
                                      "times": []})
        log_["times"].append(r.get("time", -1.0))
        if event is None and "loss" in r and "step" in r:
            log_["steps"].pop(r["step"], None)  # re-insert: dict order follows the last write
            log_["steps"][r["step"]] = r
        elif event == "validation":
            log_["validation"].pop(r.get("val_round"), None)
            log_["validation"][r.get("val_round")] = r
        elif event == "train_start" and r.get("checkpoint"):  # a start from a checkpoint: a resume
            log_["resumed"].append(r)
        elif event in ("start", "end"):
            log_[event].append(r)
    for log_ in out.values():
        log_["steps"] = sorted(log_["steps"].values(), key=lambda r: r["step"])
        log_["validation"] = sorted(log_["validation"].values(), key=lambda r: r["step"])
    return out


def plot_training(stage: str, log_: Mapping[str, list[dict]], path: Path) -> Path | None:
    """One stage's curves: loss and lr per logged step (dashed lines: resumed from a checkpoint) and, when the
    stage validates, the validation metrics per round with their 95% bootstrap CIs."""
    steps, val = log_["steps"], log_["validation"]
    if not steps and not val:
        return None
    plt = pyplot()
    panels = (["loss", "lr"] if steps else []) + (["validation"] if val else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.3), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "validation":
            x = [r["step"] for r in val]
            for k in CURVE_VAL_METRICS:
                if all(isinstance(r.get(k), (int, float)) for r in val):
                    y = np.array([r[k] for r in val], float)
                    ci = np.array([r.get(f"{k}_ci") or [np.nan, np.nan] for r in val], float)
                    line, = ax.plot(x, y, marker="o", ms=4, label=k.removeprefix("val_"))
                    ax.fill_between(x, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.12)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
            ax.set_xlabel(f"step ({len(val)} validation round{'s' if len(val) > 1 else ''}, "
                          f"{val[-1].get('val_n', '?')} questions)")
        else:
            ax.plot([r["step"] for r in steps], [r[panel] for r in steps], marker="." if len(steps) < 40 else None,
                    color="C0" if panel == "loss" else "C2")
            ax.set_title(f"{stage}: training {panel}" if panel == "loss" else "learning rate", fontsize=10)
            if panel == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            for i, e in enumerate(log_["resumed"]):
                ax.axvline(e.get("step", 0), color="grey", lw=0.8, ls="--", label="resumed" if i == 0 else None)
            if log_["resumed"] and panel == "loss":
                ax.legend(fontsize=7)
            ax.set_xlabel("step")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _attempt_seconds(log_: Mapping[str, list]) -> tuple[int, float]:
    """(attempts, wall seconds) of a stage: each 'start' event to its 'end' (the end's ``seconds``: the
    TorchTrainer's fit, while workers held their devices) or, for an attempt that never ended (killed), to the
    stage's last record before the next start."""
    starts = [e["time"] for e in log_["start"]]
    total = 0.0
    for i, t0 in enumerate(starts):
        t1 = starts[i + 1] if i + 1 < len(starts) else float("inf")
        end = next((e for e in log_["end"] if t0 <= e["time"] < t1), None)
        if end is not None:
            total += float(end.get("seconds") or end["time"] - t0)
        else:
            total += max((t for t in log_["times"] if t0 <= t < t1), default=t0) - t0
    return len(starts), total


def stage_cost(run_dir: str | os.PathLike, cfg: Mapping | None = None,
               logs: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Per stage: attempts, wall seconds, steps, training samples/s and tokens/s (overall and steady), validation
    seconds and, when ``resources.use_gpu``, GPU-hours (workers x 1 GPU each x wall time).

    Each logged row's rates cover the steps since the previous logged row (a window; its duration is its steps /
    samples_per_s up to the constant global batch). Overall throughput is the time-weighted mean over the windows:
    the training loop including its waits for data (each epoch restarts the Ray Data pipeline) and checkpoint saves,
    without model loading and validation (those are in the wall time). Steady throughput is the median window.
    """
    rd = RunDir(run_dir)
    if cfg is None:
        cfg = to_dict(rd.read_config()) if rd.config.exists() else {}
    logs = logs if logs is not None else training_log(run_dir)
    res = (cfg or {}).get("resources") or {}
    gpus = int(res.get("num_workers") or 1) if res.get("use_gpu") else 0  # fit_stage: {"GPU": 1} per worker
    out = []
    for stage, log_ in logs.items():
        steps = log_["steps"]
        prev, w, sps, tps = 0, [], [], []
        for r in steps:
            if r.get("samples_per_s"):
                w.append((r["step"] - prev) / r["samples_per_s"])
                sps.append(r["samples_per_s"])
                tps.append(r.get("tokens_per_s") or np.nan)
            prev = r["step"]
        w = np.array(w, float)
        mean = lambda v: float(np.sum(w * np.array(v, float)) / w.sum()) if len(w) and w.sum() > 0 else None
        median = lambda v: float(np.nanmedian(v)) if len(v) else None
        attempts, seconds = _attempt_seconds(log_)
        out.append({"stage": stage, "attempts": attempts, "seconds": seconds if attempts else None,
                    "steps": steps[-1]["step"] if steps else None,
                    "samples_per_s": mean(sps), "tokens_per_s": mean(tps),
                    "steady_samples_per_s": median(sps), "steady_tokens_per_s": median(tps),
                    "validation_seconds": sum(float(r.get("val_seconds") or 0) for r in log_["validation"]),
                    "gpus": gpus, "gpu_hours": gpus * seconds / 3600 if gpus and attempts else None})
    return out


def cell_cost(metrics: Mapping) -> list[dict]:
    """Per matrix cell, from ``metrics.json``'s ``timing`` (written by the evaluation): questions predicted while
    timed, their share of the prediction job's wall seconds, questions/s and, on GPUs, GPU-hours (seconds x the
    job's GPUs). Cells interleave in one Ray Data job, so a cell's seconds are the wall time of the streamed blocks
    that carried its rows, split over the rows of each block, plus its questions' share of the wait for the first
    block (actor start-up and model load); the cells' seconds add up to the job's."""
    timing = (metrics.get("timing") or {}).get("cells") or {}
    out = []
    for m, c, _ in _cells(metrics):
        t = timing.get(f"{m}/{c}")
        if not t:
            continue
        rows, seconds, gpus = int(t.get("rows") or 0), float(t.get("seconds") or 0), float(t.get("gpus") or 0)
        out.append({"model": m, "condition": c, "questions": rows, "seconds": seconds,
                    "questions_per_s": rows / seconds if seconds > 0 else None,
                    "gpu_hours": gpus * seconds / 3600 if gpus else None})
    return out


# ------------------------------------------------------------------------------------------------ human evaluation


def _is_yes_no(answer: Any) -> bool:
    from medvqa.metrics import normalize_answer

    return normalize_answer("" if answer is None else str(answer)) in ("yes", "no")


def _image_paths(run_dir: str | os.PathLike, image_ids: set[str], out_dir: Path) -> dict[str, str]:
    """image_id -> a path for the clinician: the source file where the record names one, else the test image's
    bytes written to ``out_dir/human_images/`` (path relative to ``out_dir``). Best effort: {} on failure."""
    try:
        from medvqa.evaluate import heldout_records

        records = heldout_records(RunDir(run_dir).read_config().stage2.data)
    except Exception as e:  # data gone / unreadable: leave the column empty
        log.warning("human export: test images not resolvable (%s: %s)", type(e).__name__, e)
        return {}
    out: dict[str, str] = {}
    for r in records:
        iid = str(r.get("image_id") or "")
        if iid not in image_ids or iid in out:
            continue
        src = r.get("image_path")
        if src and Path(str(src)).exists():
            out[iid] = str(src)
        elif r.get("image"):
            ext = os.path.splitext(str(r.get("image_name") or ""))[1] or ".png"
            dest = out_dir / "human_images" / f"{iid}{ext}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(bytes(r["image"]))
            out[iid] = os.path.relpath(dest, out_dir)
    return out


def export_human_eval(run_dir: str | os.PathLike, out_csv: str | os.PathLike, resolve_images: bool = True,
                      skip_conditions: Sequence[str] = HUMAN_SKIP_CONDITIONS) -> pd.DataFrame:
    """Write the cells a clinician should judge: every non-yes/no question (as the study) of every cell of the
    latest evaluation (``RUN_DIR/eval/metrics.json``; Med-HALT left out), columns ``HUMAN_COLUMNS`` with an empty
    ``clinician_score``. Returns the frame written."""
    from medvqa.predictions import read_frame

    out_csv = Path(out_csv)
    rd = RunDir(run_dir)
    cells = (load_metrics(run_dir).get("settings") or {}).get("cells") or {}
    frames = []
    for model, condition, rel in sorted((m, c, p) for m, cs in cells.items() for c, p in cs.items()):
        if condition in skip_conditions:
            continue
        df = read_frame(rd.eval / rel)
        df = df[[not _is_yes_no(a) for a in df["true_answer"]]]
        frames.append(pd.DataFrame({
            "model": df.get("model", pd.Series([model] * len(df), index=df.index)).fillna(model).astype(str),
            "condition": condition, "question_id": df["question_id"].astype(str),
            "question": df.get("prompt", pd.Series([""] * len(df), index=df.index)).astype(str),
            "true_answer": df["true_answer"].astype(str), "predicted_answer": df["predicted_answer"].astype(str),
            "image_id_shown": df.get("image_id_shown", pd.Series([""] * len(df), index=df.index)).astype(str)}))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HUMAN_COLUMNS[:-2])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    paths = _image_paths(run_dir, set(out["image_id_shown"]), out_csv.parent) if resolve_images and len(out) else {}
    out["image_path"] = [paths.get(i, "") for i in out["image_id_shown"]]
    out["clinician_score"] = ""
    out = out[list(HUMAN_COLUMNS)]
    out.to_csv(out_csv, index=False)
    return out


def read_human_eval(filled_csv: str | os.PathLike, allowed: Sequence[int] = HUMAN_SCORES) -> pd.DataFrame:
    """A filled export, validated: required columns, unique (model, condition, question_id), every
    ``clinician_score`` one of ``allowed`` (blank = not judged, dropped). Raises ``HumanEvalError`` naming the bad
    rows (1-based data rows, as a spreadsheet shows them after the header: row 2 is the first)."""
    path = StoragePath(filled_csv)
    if not path.exists():
        raise FileNotFoundError(path)
    df = pd.read_csv(io.StringIO(path.read_text()), dtype=str, keep_default_na=False)
    missing = [c for c in ("model", "condition", "question_id", "clinician_score") if c not in df.columns]
    if missing:
        raise HumanEvalError(f"{path}: missing column(s) {missing}")
    raw = df["clinician_score"].str.strip()
    allowed_f = {float(a) for a in allowed}
    bad = []
    scores = []
    for i, s in enumerate(raw):
        if s == "":
            scores.append(np.nan)
            continue
        try:
            v = float(s)
        except ValueError:
            v = None
        if v is None or v not in allowed_f:
            bad.append(f"row {i + 2} ({df['model'].iat[i]}/{df['condition'].iat[i]}/{df['question_id'].iat[i]}): "
                       f"{s!r}")
        scores.append(v if v is not None else np.nan)
    if bad:
        raise HumanEvalError(f"{path}: clinician_score must be one of {list(allowed)} or blank; bad rows: "
                             + "; ".join(bad[:20]) + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""))
    dup = df.duplicated(["model", "condition", "question_id"], keep=False)
    if dup.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(dup.to_numpy())[:20])
        raise HumanEvalError(f"{path}: duplicate (model, condition, question_id) in rows {rows}")
    df["clinician_score"] = scores
    return df


def merge_human_eval(run_dir: str | os.PathLike, filled_csv: str | os.PathLike) -> dict:
    """Validate a filled export and store it as ``RUN_DIR/report/human_eval.csv`` (the report reads it). Returns
    the summary (``human_summary``)."""
    df = read_human_eval(filled_csv)
    judged = df[df["clinician_score"].notna()]
    if judged.empty:
        raise HumanEvalError(f"{filled_csv}: no clinician_score filled in")
    RunDir(run_dir).human_eval.write_text(df.to_csv(index=False))  # atomic
    return human_summary(df)


def human_summary(df: pd.DataFrame) -> dict:
    """model -> condition -> {mean, n, ci} over judged rows."""
    from medvqa.metrics import bootstrap_ci

    out: dict[str, dict] = {}
    judged = df[df["clinician_score"].notna()]
    for (m, c), g in judged.groupby(["model", "condition"], sort=True):
        v = g["clinician_score"].to_numpy(float)
        lo, hi = bootstrap_ci(v, n_boot=1000, seed=0)
        out.setdefault(str(m), {})[str(c)] = {"mean": float(v.mean()), "n": int(v.size), "ci": [lo, hi]}
    return out


# ------------------------------------------------------------------------------------------------ the report


def _md_to_html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='table'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


# Tables scroll sideways in their own box (a wide one never widens the page); cells do not wrap ("0.552 [0.505,
# 0.600]" stays on one line); digits have equal widths so columns of numbers line up.
_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
          "div.table{overflow-x:auto}table{border-collapse:collapse;font-size:12px;margin:.5em 0;"
          "font-variant-numeric:tabular-nums}td,th{border:1px solid #ccc;padding:2px 6px;white-space:nowrap}"
          "th{background:#eee}tbody tr:nth-child(even){background:#f7f7f7}"
          "pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:12px}img{max-width:100%}")


_INLINE = re.compile(r"`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)")


def _inline_html(text: str) -> str:
    """The Markdown a 'text' item uses, as HTML: `code`, [text](url) and line breaks; everything else escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        out.append(f"<code>{html.escape(m[1])}</code>" if m[1] is not None else
                   f'<a href="{html.escape(m[3])}">{html.escape(m[2])}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return re.sub(r" *\n", "<br>", "".join(out))


def render_sections(title: str, sections: Sequence[tuple[str, Sequence[tuple[str, Any]]]]) -> tuple[str, str]:
    """(Markdown, HTML page) of ``sections``: (heading, items), each item (kind, payload) with kind 'text' (str with
    `code`, [links](url) and line breaks), 'table' ((header, rows)), 'image' (path relative to the report) or 'code'
    (str)."""
    md, body = [f"# {title}", ""], []
    for heading, items in sections:
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for kind, payload in items:
            if kind == "text":
                md += [payload, ""]
                body.append(f"<p>{_inline_html(payload)}</p>")
            elif kind == "table":
                md += [_md_table(*payload), ""]
                body.append(_md_to_html_table(*payload))
            elif kind == "image":
                md += [f"![{Path(payload).stem}]({payload})", ""]
                body.append(f'<img src="{html.escape(payload)}" alt="{html.escape(Path(payload).stem)}">')
            elif kind == "code":
                md += ["```", payload.rstrip(), "```", ""]
                body.append(f"<pre>{html.escape(payload)}</pre>")
            else:
                raise ValueError(f"unknown report item kind {kind!r}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>" + "\n".join(body) + "</body></html>")
    return "\n".join(md), page


def training_items(logs: Mapping[str, Mapping], curves: Sequence[Path], out_dir: Path) -> list[tuple[str, Any]]:
    if not logs:
        return [("text", "No training records in metrics.jsonl (a base-model-only evaluation, or an older run).")]
    items: list[tuple[str, Any]] = [
        ("text", "Per stage, from metrics.jsonl: training loss (mean over the micro-batches since the previous logged "
                 "step) and learning rate per logged step; dashed lines mark a resume from a checkpoint. Stages with "
                 "a validation split also show the validation metrics per round (95% bootstrap bands).")]
    items += [("image", c.relative_to(out_dir).as_posix()) for c in curves]
    val = [[stage, str(r.get("val_round", "")), str(r["step"]), str(r.get("val_n", "")),
            *[fmt_ci(r.get(k), r.get(f"{k}_ci")) for k in CURVE_VAL_METRICS]]
           for stage, log_ in logs.items() for r in log_["validation"]]
    if val:
        items += [("text", "Validation rounds:"),
                  ("table", (("stage", "round", "step", "n", *[k.removeprefix("val_") for k in CURVE_VAL_METRICS]),
                             val))]
    return items


def cost_items(stages: Sequence[dict], cells: Sequence[dict]) -> list[tuple[str, Any]]:
    num = lambda x, d=1: fmt(x, d) if x is not None else "—"
    items: list[tuple[str, Any]] = [
        ("text", "Wall time of every training attempt (a killed one up to its last record). Samples/s and tokens/s "
                 "of the training loop over all its logged windows (time-weighted: with its waits for data, as each "
                 "epoch restarts the data pipeline, and checkpoint saves; without model loading and validation), "
                 "and steady: the median window. GPU-hours = workers x 1 GPU x wall time (— on CPU).")]
    if stages:
        rows = [[s["stage"], str(s["attempts"]), num(s["seconds"]), num(s["steps"], 0), num(s["samples_per_s"], 2),
                 num(s["tokens_per_s"], 0), num(s["steady_samples_per_s"], 2), num(s["steady_tokens_per_s"], 0),
                 num(s["validation_seconds"]), num(s["gpu_hours"], 3)] for s in stages]
        gpu_hours = [s["gpu_hours"] for s in stages if s["gpu_hours"] is not None]
        seconds = [s["seconds"] for s in stages if s["seconds"] is not None]
        rows.append(["total", str(sum(s["attempts"] for s in stages)), num(sum(seconds)) if seconds else "—",
                     "", "", "", "", "",
                     num(sum(s["validation_seconds"] for s in stages)), num(sum(gpu_hours), 3) if gpu_hours else "—"])
        items.append(("table", (("stage", "attempts", "wall s", "steps", "samples/s", "tokens/s", "steady samples/s",
                                 "steady tokens/s", "validation s", "GPU-hours"), rows)))
    else:
        items.append(("text", "No training records in metrics.jsonl."))
    items.append(("text", "Evaluation matrix: each cell's share of the prediction job's wall time (cells run "
                          "interleaved in one Ray Data job: a streamed block's time is split over its questions, the "
                          "start-up before the first block over all questions; the cells' seconds add up to the "
                          "job's), questions/s and GPU-hours (— on CPU). Questions kept from an interrupted "
                          "evaluation were not timed."))
    if cells:
        rows = [[c["model"], c["condition"], str(c["questions"]), num(c["seconds"]), num(c["questions_per_s"], 2),
                 num(c["gpu_hours"], 4)] for c in cells]
        seconds, questions = sum(c["seconds"] for c in cells), sum(c["questions"] for c in cells)
        gpu_hours = [c["gpu_hours"] for c in cells if c["gpu_hours"] is not None]
        rows.append(["total", "", str(questions), num(seconds), num(questions / seconds if seconds else None, 2),
                     num(sum(gpu_hours), 4) if gpu_hours else "—"])
        items.append(("table", (("model", "condition", "questions", "seconds", "questions/s", "GPU-hours"), rows)))
    else:
        items.append(("text", "No timing in eval/metrics.json (evaluated before timing was recorded)."))
    return items


def build_report(run_dir: str | os.PathLike, audit: bool = True) -> dict:
    """Write ``RUN_DIR/report/report.md``, ``report.html`` and ``plots/*.png`` (in object storage: made in a local
    temp folder, then uploaded). Returns the paths written."""
    report = RunDir(run_dir).report
    with staged(report) as out_dir:
        out = _write_report(run_dir, out_dir, audit)

    def where(written: str) -> str:  # where a file written into out_dir ends up
        return str(report / Path(written).relative_to(out_dir).as_posix())

    return {**out, "markdown": where(out["markdown"]), "html": where(out["html"]),
            "plots": [where(p) for p in out["plots"]]}


def _write_report(run_dir: str | os.PathLike, out_dir: Path, audit: bool) -> dict:
    rd = RunDir(run_dir)
    metrics = load_metrics(run_dir)
    plots = out_dir / "plots"
    prov = provenance(run_dir)
    leak = leakage_section(run_dir, audit=audit, metrics=metrics)
    bar = plot_metrics(metrics, plots / "metrics.png")
    forest = plot_forest(metrics, plots / "forest.png")
    logs = training_log(run_dir)
    curves = [c for stage, log_ in logs.items() if (c := plot_training(stage, log_, plots / f"training_{stage}.png"))]
    human = human_summary(read_human_eval(rd.human_eval)) if rd.human_eval.exists() else None
    settings = metrics.get("settings") or {}

    # (title, kind, payload): kind 'table' (header, rows), 'text' str, 'image' relpath, 'code' str
    sections: list[tuple[str, list[tuple[str, Any]]]] = []
    sections.append(("Provenance", [("text", f"Run id: `{prov['run_id']}`  \nRun directory: `{prov['run_dir']}`  \n"
                                             f"Git commit: `{prov['git_commit']}`"
                                             f"{' (dirty working tree)' if prov['git_dirty'] else ''}  \n"
                                             f"Report generated: {prov['generated']}  \n"
                                             f"Evaluated models: {', '.join(settings.get('evaluated') or []) or '—'}; "
                                             f"conditions: {', '.join(settings.get('conditions') or []) or '—'}; "
                                             f"test questions: {settings.get('n_questions', '—')}; "
                                             f"seed: {settings.get('seed', '—')}")]))
    warning = [("text", f"NOT A CLEAN TEST: {(settings.get('leakage') or {}).get('why')}.")] \
        if not (settings.get("leakage") or {}).get("meaningful", True) else []
    sections.append(("Results (Figure 2): mean [95% bootstrap CI]", warning + [
        ("text", f"Test set: {settings.get('protocol') or 'the test split of the stage-2 source'}."),
        ("text", "Study metrics: " + ", ".join(STUDY_METRICS) + ". Standard metrics: " + ", ".join(STANDARD_METRICS)
         + " (closed_accuracy over closed questions, open_recall over open ones)."),
        ("table", (FIG2_HEADER, figure2_rows(metrics)))] + ([("image", "plots/metrics.png")] if bar else [])))
    conditions = [c for c in CONDITION_DOCS if c in (settings.get("conditions") or [])
                  or any(s.get("condition") == c for s in metrics.get("skipped_cells") or [])]
    sections.append(("Conditions and skipped cells", [
        ("table", (("condition", "what it measures"), [[c, CONDITION_DOCS[c]] for c in conditions]))]
        + ([("text", "Cells not evaluated, with the reason:"),
            ("table", (("model", "condition", "reason"), skipped_rows(metrics)))] if skipped_rows(metrics) else
           [("text", "Every cell of the matrix was evaluated.")])))
    sr = seed_rows(metrics)
    if sr:
        sections.append(("Across seeds (training noise)", [
            ("text", "Models trained with several seeds (`<model>@<seed>` above): mean ± sample SD across seeds, "
                     "[min, max], then each seed. The CIs above measure question sampling, this spread training "
                     "noise; a difference between models smaller than it is not a finding."),
            ("table", (("model", "condition", "seeds", "statistic", *TABLE_METRICS), sr))]))
    bd = breakdown_tables(metrics)
    sections.append(("Breakdown by answer type and question type",
                     [item for col, (h, r) in bd.items() for item in (("text", f"By {col}:"), ("table", (h, r)))]
                     or [("text", "No breakdowns in metrics.json.")]))
    rel = reliance_rows(metrics)
    sections.append(("Image reliance (true → swapped)", [
        ("text", "Drop = mean score with the true image minus with another image (paired bootstrap); positive "
                 "means the model uses the image."),
        ("table", (("model", "metric", "true", "swapped", "drop [95% CI]", "p", "n"), rel)) if rel else
        ("text", "Not available (needs the true and swapped conditions).")]))
    vt = vs_true_rows(metrics)
    if vt:
        sections.append(("Each condition against true (same questions, paired)", [
            ("text", "Difference = mean score in the condition minus with the true image and prompt (paired "
                     "bootstrap). Blank below true: the model reads the image; few-shot above true: the examples "
                     "help; swapped: minus the image reliance above."),
            ("table", (("model", "condition", "metric", "true", "condition", "condition − true [95% CI]", "p", "n"),
                       vt))]))
    mh = metrics.get("medhalt_abstention") or {}
    ab = abstention_rows(metrics)
    sections.append(("Abstention (Med-HALT)", [
        ("text", "Med-HALT nonsense questions: declining is right. " + (
            "; ".join(f"{m}: {fmt_ci(v.get('decline_rate'), (v.get('ci') or {}).get('decline_rate'))} "
                      f"(n={v.get('n')})" for m, v in mh.items()) if mh else "The medhalt condition was not run.")),
        ("text", "Decline rate of every cell:"),
        ("table", (("model", "condition", "decline rate [95% CI]", "declined / n"), ab))]))
    pr = paired_rows(metrics)
    sections.append(("Paired tests between models (true condition)", [
        ("table", (("comparison (B_vs_A)", "metric", "A", "B", "B−A [95% CI]", "p boot", "p McNemar", "n"), pr))
        if pr else ("text", "Only one model on the true condition: no paired tests.")]
        + ([("image", "plots/forest.png")] if forest else [])))
    sections.append(("Training curves (Figure 4)", training_items(logs, curves, out_dir)))
    sections.append(("Cost", cost_items(stage_cost(run_dir, logs=logs), cell_cost(metrics))))
    sections.append(("Leakage", [("text", leak["statement"])]
                     + ([("text", "\n".join(leak["measured"]))] if leak["measured"] else [])
                     + ([("code", __import__("medvqa.audit", fromlist=["format_audit"]).format_audit(leak["audit"]))]
                        if leak.get("audit") else [])))
    sources = rejects_rows(run_dir, metrics)
    sections.append(("Data and rejects", [
        ("text", "Every source: records kept and rejected (a record that fails validation is never used; each "
                 "is listed with its reason in the file)."),
        ("table", (("source", "what", "valid", "rejected", "reasons", "file"), sources)) if sources else
        ("text", f"No source recorded: `{rd.manifest.name}` and the evaluation's sources are missing.")]))
    if human:
        rows = [[m, c, fmt_ci(s["mean"], s["ci"], 2), str(s["n"])] for m, cs in human.items() for c, s in cs.items()]
        sections.append(("Human evaluation (clinician scores, open questions)", [
            ("text", f"Scores {HUMAN_SCORES[0]}–{HUMAN_SCORES[-1]} from `{rd.human_eval.name}`."),
            ("table", (("model", "condition", "mean score [95% CI]", "n judged"), rows))]))
    else:
        sections.append(("Human evaluation", [("text", "Not yet: `medvqa human-export RUN_DIR OUT.csv`, fill "
                                                       "clinician_score, then `medvqa human-merge RUN_DIR OUT.csv`.")]))
    sections.append(("Configuration", [("text", f"[config.yaml]({prov['config_path']})"),
                                       ("code", prov["config_text"] or "(config.yaml missing)")]))

    md, page = render_sections(f"medvqa report: {prov['run_id']}", sections)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(page)
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"),
            "plots": [str(p) for p in (bar, forest, *curves) if p], "human": human is not None,
            "leakage": leak["statement"]}
