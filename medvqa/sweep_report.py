"""Sweep report: every trial, the Figure-3 curve, what mattered, and the best configuration as a preset.

Reads only files (no Ray): ``<sweep_dir>/space.yaml``, Tune's per-trial folders (``params.json``, errors, the
``medvqa_run.json`` link to the trial's run directories, one per replicate, ``result.json`` for Tune's trial time)
and each run's ``metrics.jsonl`` (its validation rounds). A trial is one sampled configuration trained for every
replicate (``medvqa.sweep``). Writes ``<sweep_dir>/report/``:

- ``trials.csv``: one row per trial: status, parameters, replicates, validation rounds reached by all of them, the
  metric's mean over the replicates with its band (a 95% t-interval across replicates; one replicate: its bootstrap
  CI over validation questions), each replicate's value, the other ``val_*`` metrics (means), training seconds and
  the run directories (every number traces to its runs: ``<run_dir>/metrics.jsonl`` holds the validation rows).
  ``runs.csv``: one row per replicate run.
- ``report.md`` / ``report.html``: the tables below and the plots.
- ``curve.png``: validation score vs ``report.x`` (ROCO subset size), one line per ``report.line`` (LoRA rank).
  A point is the mean over the runs of that cell's completed trials (replicates and any other parameter pooled);
  its band is a 95% t-interval across those runs when there are two or more, else the run's own bootstrap CI over
  validation questions.
- importance: for each parameter (and each replicate key, as a noise reference), the share of the variance of the
  completed runs' scores explained by its values (one-way eta squared). A parameter that explains no more than the
  seed did not matter measurably.
- ``best.yaml``: the resolved config of the best cell's trial, with the validation carve removed (train on all of
  stage 2's training split), the seed back to the base preset's and a run name of its own:
  ``python jobs/two_stage.py --preset <sweep_dir>/report/best.yaml`` trains it unchanged.

Status: ``completed`` (reached its final validation round), ``stopped`` (ASHA stopped it at a lower round, or the
sweep was interrupted there), ``error`` (Tune recorded an error), ``pending`` (no validation round yet).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medvqa.report import fmt, fmt_ci, pyplot, render_sections
from medvqa.runs import RunDir, read_jsonl, read_metrics
from medvqa.storage import StoragePath, staged

TRIAL_LINK = "medvqa_run.json"  # in each Tune trial folder (written by sweep.trial_fn): trial id and run directory
STATUS_ORDER = ("completed", "stopped", "error", "pending")
# Two-sided 95% Student-t quantiles for 1..10 degrees of freedom (replicate counts are small); 1.96 beyond 30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    return 2.042 if df <= 30 else 1.96


def validation_rounds(run_dir: str | os.PathLike) -> list[dict]:
    """A run's stage-2 validation rows from its metrics.jsonl, one per round (the last if a resume repeated one)."""
    if not run_dir:
        return []
    rounds = {r["val_round"]: r for r in read_metrics(RunDir(run_dir))
              if r.get("event") == "validation" and r.get("stage") == "stage2"}
    return [rounds[k] for k in sorted(rounds)]


def _link(trial_dir: Path, results: list[dict]) -> tuple[str | None, dict[str, str], dict[str, dict]]:
    """(trial id, replicate label -> run dir, label -> replicate values) of a Tune trial folder, from the link
    ``sweep.trial_fn`` writes (or, before it was written, Tune's results)."""
    link = json.loads((trial_dir / TRIAL_LINK).read_text()) if (trial_dir / TRIAL_LINK).exists() else {}
    trial_id = link.get("trial_id") or next((r["trial_id"] for r in results if r.get("trial_id")), None)
    runs = link.get("runs") or {}
    return trial_id, runs, link.get("replicates") or {label: {} for label in runs}


def load_runs(sweep_dir: str | os.PathLike) -> tuple[dict, pd.DataFrame]:
    """(the sweep's space, one row per replicate run of every trial). Raises FileNotFoundError when ``sweep_dir`` is
    not a sweep.

    Parameters and errors come from Tune's trial folders; the scores from the runs' directories (Tune's
    ``result.json`` misses rounds reported just before a kill, the runs' metrics.jsonl do not). A trial whose link
    is not written yet has one row without a run."""
    sweep_dir = StoragePath(sweep_dir)
    space_file = sweep_dir / "space.yaml"
    if not space_file.exists():
        raise FileNotFoundError(f"{space_file}: not a sweep directory (run `medvqa sweep run` first)")
    space = yaml.safe_load(space_file.read_text())
    metric = space["metric"]
    rows = []
    for params_file in (sweep_dir / "tune").glob("*/params.json"):
        trial_dir = params_file.parent
        params = json.loads(params_file.read_text())
        results = read_jsonl(trial_dir / "result.json")
        trial_id, runs, replicates = _link(trial_dir, results)
        error = ""
        if (trial_dir / "error.txt").exists() or (trial_dir / "error.pkl").exists():
            text = (trial_dir / "error.txt").read_text().strip() if (trial_dir / "error.txt").exists() else ""
            error = text.splitlines()[-1][:300] if text else "see error.pkl"
        tune_seconds = [r["time_total_s"] for r in results if "time_total_s" in r]
        for label, run_dir in (runs or {"": None}).items():
            rounds = validation_rounds(run_dir)
            last = rounds[-1] if rounds else {}
            status = "completed" if last.get("val_final") else "stopped" if rounds else "pending"
            ci = last.get(f"{metric}_ci") or [None, None]
            row = {"trial_id": trial_id or trial_dir.name, "replicate": label,
                   **{k: params.get(k) for k in space["params"]}, **replicates.get(label, {}),
                   "run_status": status, "rounds": {r["val_round"]: r.get(metric) for r in rounds},
                   "val_round": last.get("val_round"), metric: last.get(metric), "ci_low": ci[0], "ci_high": ci[1],
                   "val_n": last.get("val_n"), "seconds": tune_seconds[-1] if tune_seconds else None,
                   "run_dir": run_dir, "trial_dir": str(trial_dir), "error": error}
            row.update({k: v for k, v in last.items() if k.startswith("val_") and not k.endswith("_ci")
                        and k not in row and not isinstance(v, (list, dict))})
            rows.append(row)
    return space, pd.DataFrame(rows)


def load_trials(sweep_dir: str | os.PathLike) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(the sweep's space, one row per trial, one row per run: ``load_runs``). A trial's status: ``error`` (Tune
    recorded one), ``completed`` (every replicate reached its final round), ``stopped`` (at a lower round: ASHA, or
    an interrupted sweep), ``pending``. Its score: the mean over its replicates at the last round all of them
    reached, with the band described in the module doc."""
    space, runs = load_runs(sweep_dir)
    metric = space["metric"]
    rows = []
    for trial_id, g in (runs.groupby("trial_id", sort=False) if not runs.empty else []):
        first = g.iloc[0]
        common = set.intersection(*(set(r) for r in g["rounds"])) if g["run_dir"].notna().all() else set()
        at = max(common) if common else None
        values = [float(r[at]) for r in g["rounds"]] if at is not None else []
        if first["error"]:
            status = "error"
        elif len(g) and (g["run_status"] == "completed").all():
            status = "completed"
        else:
            status = "stopped" if at is not None else "pending"
        if len(values) >= 2:
            v = np.array(values)
            half = _t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
            low, high = v.mean() - half, v.mean() + half
        elif values and first["val_round"] == at:
            low, high = first["ci_low"], first["ci_high"]
        else:
            low = high = None
        row = {"trial_id": trial_id, "status": status, **{k: first[k] for k in space["params"]},
               "replicates": len(g), "val_round": at, metric: float(np.mean(values)) if values else None,
               "ci_low": low, "ci_high": high,
               f"{metric}_by_replicate": "; ".join(f"{lbl or '-'}: {val:.4f}" for lbl, val in
                                                     zip(g["replicate"], values)),
               "seconds": first["seconds"], "run_dir": first["run_dir"],
               "run_dirs": " ".join(str(d) for d in g["run_dir"] if d), "trial_dir": first["trial_dir"],
               "error": first["error"]}
        done = g[g["run_status"] == "completed"]
        row.update({k: float(done[k].astype(float).mean()) for k in g.columns
                    if k.startswith("val_") and k not in row and k != "val_round" and len(done)})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["_order"] = df["status"].map(STATUS_ORDER.index)
        df = df.sort_values(["_order", metric], ascending=[True, space["mode"] == "min"]).drop(columns="_order")
    return space, df.reset_index(drop=True), runs


def _completed_runs(trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the completed trials."""
    if trials.empty or runs.empty:
        return runs.iloc[0:0]
    done = set(trials.loc[trials["status"] == "completed", "trial_id"])
    return runs[runs["trial_id"].isin(done)]


def cell_summary(space: dict, trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of completed trials grouped by searched parameters (replicates pooled): n runs, mean, band (see the
    module doc), the trials."""
    metric, params = space["metric"], list(space["params"])
    done = _completed_runs(trials, runs)
    if done.empty:
        return pd.DataFrame(columns=[*params, "n", "mean", "low", "high", "trial_ids"])
    rows = []
    for key, g in done.groupby(params, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        v = g[metric].astype(float).to_numpy()
        if len(v) >= 2:
            half = _t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
            low, high = v.mean() - half, v.mean() + half
        else:
            low, high = g["ci_low"].iloc[0], g["ci_high"].iloc[0]
        rows.append({**dict(zip(params, key)), "n": len(v), "mean": float(v.mean()), "low": low, "high": high,
                     "trial_ids": " ".join(dict.fromkeys(g["trial_id"]))})
    out = pd.DataFrame(rows)
    return out.sort_values("mean", ascending=space["mode"] == "min").reset_index(drop=True)


def importance(space: dict, trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Eta squared of each searched parameter and replicate key over the completed trials' runs (module doc)."""
    metric = space["metric"]
    done = _completed_runs(trials, runs)
    keys = [(k, "parameter") for k in space["params"]] + [(k, "replicate") for k in space.get("replicates") or {}]
    rows = []
    for key, role in keys:
        if len(done) < 3 or key not in done.columns:
            rows.append({"key": key, "role": role, "eta_squared": None, "levels": None})
            continue
        y = done[metric].astype(float)
        total = float(((y - y.mean()) ** 2).sum())
        groups = done.groupby(key, dropna=False)[metric]
        between = float(sum(len(g) * (g.astype(float).mean() - y.mean()) ** 2 for _, g in groups))
        rows.append({"key": key, "role": role, "eta_squared": between / total if total > 0 else 0.0,
                     "levels": groups.ngroups})
    return pd.DataFrame(rows)


def best_preset(space: dict, trials: pd.DataFrame, cells: pd.DataFrame) -> tuple[dict, dict] | None:
    """(resolved config dict, provenance) for the best cell, ready to train on the full training split."""
    from medvqa.config import load_config, to_dict

    if cells.empty:
        return None
    best = cells.iloc[0]
    trial_id = best["trial_ids"].split()[0]
    trial = trials[trials["trial_id"] == trial_id].iloc[0]  # its first replicate's run: the replicates reset below
    cfg = to_dict(RunDir(str(trial["run_dir"])).read_config())  # FileNotFoundError when the run is gone
    base = to_dict(load_config(space["preset"]))
    cfg["stage2"]["data"]["validation_fraction"] = base["stage2"]["data"]["validation_fraction"]
    cfg["stage2"]["validate_every_n_steps"] = base["stage2"]["validate_every_n_steps"]
    for key in space.get("replicates") or {}:  # a replicate seed is not a hyper-parameter: back to the preset's
        *parents, leaf = key.split(".")
        node, ref = cfg, base
        for part in parents:
            node, ref = node[part], ref[part]
        node[leaf] = ref[leaf]
    cfg["run"]["name"] = f"{space['name']}-best"
    cfg["run"]["output_dir"] = base["run"]["output_dir"]
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items() if k in space["params"]}
    prov = {"params": params, "mean": float(best["mean"]), "band": [_num(best["low"]), _num(best["high"])],
            "n_runs": int(best["n"]), "trial_ids": best["trial_ids"], "run_dir": str(trial["run_dir"])}
    return cfg, prov


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def plot_curve(space: dict, cells: pd.DataFrame, path: Path) -> Path | None:
    """Figure-3 style: mean validation score vs report.x, one line per report.line, with bands."""
    x, line = space["report"].get("x"), space["report"].get("line")
    if cells.empty or x is None:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    groups = cells.groupby(line) if line else [(None, cells)]
    for value, g in groups:
        g = g.groupby(x).agg(mean=("mean", "mean"), low=("low", "min"), high=("high", "max")).reset_index()
        g = g.sort_values(x)
        label = f"{line}={value}" if line else None
        ax.plot(g[x], g["mean"], marker="o", label=label)
        ax.fill_between(g[x], g["low"].astype(float), g["high"].astype(float), alpha=0.2)
    xs = cells[x].astype(float)
    if xs.min() > 0 and xs.max() / xs.min() >= 4:
        ax.set_xscale("log")
        ax.set_xticks(sorted(xs.unique()), [f"{v:g}" for v in sorted(xs.unique())])  # the swept values, not 10^k
        ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel(f"{space['metric']} (validation)")
    ax.set_title(f"sweep {space['name']}: completed trials, 95% bands")
    if line:
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | os.PathLike) -> dict:
    """Write ``<sweep_dir>/report/`` (in object storage: made in a local temp folder, then uploaded); returns the
    paths written and the best cell."""
    sweep_dir = StoragePath(sweep_dir)
    space, trials, runs = load_trials(sweep_dir)
    if trials.empty:
        raise ValueError(f"{sweep_dir}: no trials yet")
    with staged(sweep_dir / "report") as out:
        return _write_files(sweep_dir, space, trials, runs, out)


def _write_files(sweep_dir: StoragePath, space: dict, trials: pd.DataFrame, runs: pd.DataFrame, out: Path) -> dict:
    """The report's files, written into ``out``; the paths shown and returned are where they end up."""
    report = sweep_dir / "report"
    metric = space["metric"]
    trials.to_csv(out / "trials.csv", index=False)
    runs.drop(columns="rounds").to_csv(out / "runs.csv", index=False)
    cells = cell_summary(space, trials, runs)
    imp = importance(space, trials, runs)
    curve = plot_curve(space, cells, out / "curve.png")
    best = best_preset(space, trials, cells)
    written = {"trials_csv": str(report / "trials.csv"), "runs_csv": str(report / "runs.csv"),
               "markdown": str(report / "report.md"), "html": str(report / "report.html"),
               "curve": str(report / "curve.png") if curve else None, "best_yaml": None,
               "best": None, "trials": len(trials),
               "status": {s: int((trials["status"] == s).sum()) for s in STATUS_ORDER}}
    if best:
        cfg, prov = best
        header = (f"# Best configuration of sweep {space['name']} ({sweep_dir})\n"
                  f"# {metric} = {prov['mean']:.4f} (mean of {prov['n_runs']} run(s) of trial(s) {prov['trial_ids']}) "
                  f"with {json.dumps(prov['params'])}\n# from {prov['run_dir']}; validation carve removed: train on "
                  f"the full split.\n#   python jobs/two_stage.py --preset {report / 'best.yaml'}\n")
        (out / "best.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        written.update(best_yaml=str(report / "best.yaml"), best=prov)

    params = list(space["params"])
    trial_rows = [[r["trial_id"], r["status"], *[r[k] for k in params], int(r["replicates"]),
                   int(r["val_round"]) if pd.notna(r["val_round"]) else "—",
                   fmt_ci(_num(r[metric]), [_num(r["ci_low"]), _num(r["ci_high"])]),
                   r[f"{metric}_by_replicate"] or "—", fmt(_num(r["seconds"]), 0), r["run_dirs"] or "—"]
                  for _, r in trials.iterrows()]
    trial_header = ["trial", "status", *params, "replicates", "rounds", f"mean {metric} [95% band]",
                    "per replicate", "seconds", "run dirs"]
    cell_rows = [[*[r[k] for k in space["params"]], int(r["n"]), fmt_ci(r["mean"], [_num(r["low"]), _num(r["high"])]),
                  r["trial_ids"]] for _, r in cells.iterrows()]
    cell_header = [*space["params"], "runs", f"mean {metric} [95% band]", "trial ids"]
    imp_rows = [[r["key"], r["role"], fmt(_num(r["eta_squared"])), int(r["levels"]) if pd.notna(r["levels"]) else "—"]
                for _, r in imp.iterrows()]
    counts = ", ".join(f"{n} {s}" for s, n in written["status"].items() if n)
    seconds = trials["seconds"].astype(float).sum()
    stopping = "ASHA " + json.dumps(space["asha"]) if space.get("asha") else "none"
    reps = ", ".join(f"{k} {v}" for k, v in (space.get("replicates") or {}).items()) or "none"
    summary = (f"Directory: `{sweep_dir}`  \nBase preset: `{space['preset']}`; metric `{metric}` ({space['mode']}) on "
               "a validation split carved from stage-2 training data (never the test split).  \n"
               f"Replicates: {reps}: every trial (one sampled configuration) trains all of them; Optuna and ASHA see "
               "their mean per validation round.  \n"
               f"Trials: {len(trials)} ({counts}); {seconds:.0f} trial-seconds.  \n"
               f"Early stopping: {stopping}; Optuna TPE seed {space['seed']}; study in "
               f"{'`optuna.db`' if sweep_dir.is_local else 'Tune searcher state under `tune/`'}.")
    best_text = "No completed trial yet."
    if best:
        top = written["best"]
        best_text = (f"{json.dumps(top['params'])}: {metric} {fmt_ci(top['mean'], top['band'])} over {top['n_runs']} "
                     f"run(s). Preset: `best.yaml` (`python jobs/two_stage.py --preset {report / 'best.yaml'}`).")
    importance_note = ("Share of the score variance explained by each key's values; the replicate seed is the noise "
                       "reference.")
    sections = [
        ("Sweep", [("text", summary)]),
        ("Best configuration", [("text", best_text)]),
        ("Curve (Figure 3)", [("image", "curve.png")] if curve else [("text", "No completed trial yet.")]),
        ("Cells (completed trials, replicates pooled)", [("table", (cell_header, cell_rows))]),
        ("What mattered (eta squared of the completed runs' scores)",
         [("text", importance_note), ("table", (["key", "role", "eta²", "levels"], imp_rows))]),
        ("Trials", [("table", (trial_header, trial_rows))]),
    ]
    failed = trials[trials["status"] == "error"]
    if not failed.empty:
        sections.append(("Errors", [("table", (["trial", "last line of error.txt", "Tune trial folder"],
                                               failed[["trial_id", "error", "trial_dir"]].values.tolist()))]))
    md, page = render_sections(f"medvqa sweep: {space['name']}", sections)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page)
    return written
