"""``medvqa`` command line: a thin, closed map from commands to library functions.

Heavy imports (torch, ray, transformers) happen inside commands so ``medvqa --help`` is instant. New knobs go into
the config (``key=value`` overrides), not new flags.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Medical VQA fine-tuning and evaluation on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and audit data sources.")
app.add_typer(data_app, name="data")
sweep_app = typer.Typer(no_args_is_help=True, help="Ray Tune + Optuna sweeps (search spaces under tune/).")
app.add_typer(sweep_app, name="sweep")
model_app = typer.Typer(no_args_is_help=True, help="Offline models of a real checkpoint's shape.")
app.add_typer(model_app, name="model")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(preset: str, overrides: Optional[List[str]]):
    from medvqa.config import ConfigError, load_config

    try:
        return load_config(preset, overrides or [])
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2)


def _echo_eval(out: dict) -> None:
    typer.echo(json.dumps({"metrics": out["metrics_path"], "predicted": out["predicted"], "skipped": out["skipped"],
                           "rows_reused": out["rows_reused"]}))


@app.command()
def train(overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. stage2.lr=1e-4"),
          preset: str = typer.Option("tiny", help="Preset name (see `medvqa presets`) or a YAML path."),
          verbose: bool = typer.Option(False, "--verbose", help="Show Ray's own output too (= run.verbose=true).")
          ) -> None:
    """Run the two-stage fine-tuning job (same as `python jobs/two_stage.py`); with run.evaluate=true, then the
    evaluation matrix (eval.* settings), first training the single-stage baseline beside the run (same stage-2
    config, data and seed; resumable like any run) when eval.models asks for it. The terminal shows a progress bar
    per stage and evaluation pass; everything else goes to RUN_DIR/logs/train.log (--verbose: to the terminal too)."""
    cfg = _load(preset, [*(overrides or []), *(["run.verbose=true"] if verbose else [])])
    setup_logging()
    from medvqa.data.pipeline import TooManyRejects
    from medvqa.observe import session
    from medvqa.train import run_two_stage

    single = None
    try:
        with session(cfg, "train", preset=preset, shutdown_ray=True):
            run_dir = run_two_stage(cfg)
            if cfg.run.evaluate:  # inside the session: the evaluation draws its bar and logs to the same file
                from medvqa.evaluate import evaluate_run, single_stage_config

                if cfg.stage1.enabled and "single_stage" in cfg.eval.models:
                    single = run_two_stage(single_stage_config(cfg))
                evaluated = evaluate_run(run_dir, single_stage=single)
    except TooManyRejects:
        raise typer.Exit(3)  # the session printed the cause and where the full log is
    except Exception:
        if cfg.run.verbose:
            raise
        raise typer.Exit(1)
    typer.echo(f"run dir: {run_dir}")
    if single:
        typer.echo(f"single-stage baseline run dir: {single}")
    if cfg.run.evaluate:
        _echo_eval(evaluated)


@app.command("eval")
def eval_matrix(run_dir: str = typer.Argument(..., help="Run directory (config.yaml, adapters/)."),
                overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the run's config: "
                                                                "eval.* (see `medvqa config --docs`), resources.*; "
                                                                "model.* must stay as trained."),
                single_stage: Optional[str] = typer.Option(None, help="Run directory of the single-stage baseline "
                                                           "(default: the run's sibling, when trained)."),
                seed_runs: Optional[List[str]] = typer.Option(None, help="Run directory of RUN_DIR's model trained "
                                                              "with another seed (repeatable): every run is "
                                                              "evaluated as <model>@<seed> and summarised across "
                                                              "seeds."),
                base_only: bool = typer.Option(False, help="Evaluate only the base model.")) -> None:
    """Evaluation matrix of a run: models x conditions in one Ray Data batch-inference job, written to RUN_DIR/eval/
    (resumable: finished questions are kept; a change of model, adapter, prompt, decoding or questions predicts
    anew). Settings: the eval.* section, e.g. `medvqa eval RUN_DIR eval.max_new_tokens=8 eval.test_limit=50`."""
    setup_logging()
    from medvqa.config import ConfigError
    from medvqa.data.pipeline import TooManyRejects
    from medvqa.evaluate import evaluate_run

    try:
        out = evaluate_run(run_dir, overrides or [], single_stage=single_stage, base_only=base_only,
                           seed_runs=seed_runs or [])
    except (ConfigError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except TooManyRejects as e:
        typer.echo(f"data error: {e}", err=True)
        raise typer.Exit(3)
    _echo_eval(out)


@app.command()
def config(overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides"),
           preset: str = typer.Option("tiny", help="Preset name or YAML path."),
           docs: bool = typer.Option(False, "--docs", help="List every field with its documentation.")) -> None:
    """Print the resolved config (or, with --docs, every field and what it means)."""
    from medvqa.config import dump_yaml, field_docs

    cfg = _load(preset, overrides)
    if docs:
        for key, value, text in field_docs(cfg):
            typer.echo(f"{key} = {value}\n    {text}")
    else:
        typer.echo(dump_yaml(cfg))


@app.command()
def presets() -> None:
    """List the presets."""
    from medvqa.config import list_presets, preset_path

    for name in list_presets():
        first = preset_path(name).read_text().splitlines()[0].lstrip("# ")
        typer.echo(f"{name:22s} {first}")


@app.command()
def score(path: str = typer.Argument(..., help="Predictions: JSON / JSON lines / CSV / parquet."),
          compare: Optional[str] = typer.Option(None, help="A second model's predictions: paired tests (B vs A)."),
          map: Optional[List[str]] = typer.Option(None, "--map", help="Column mapping CANON=COL, e.g. "
                                                  "true_answer=gold (repeatable)."),
          n_boot: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
          seed: int = typer.Option(0, help="Bootstrap seed."),
          extract: bool = typer.Option(False, help="Apply the answer extraction to raw generations first."),
          as_json: bool = typer.Option(False, "--json", help="Print one machine-readable JSON object.")) -> None:
    """Score a prediction file with the study's metrics and the standard ones, with confidence intervals."""
    from medvqa.score import PredictionsError, compare_files, format_report, score_file

    columns = dict(kv.split("=", 1) for kv in map or []) or None
    kw = dict(columns=columns, n_boot=n_boot, seed=seed, extract=extract)
    try:
        result = compare_files(path, compare, **kw) if compare else score_file(path, **kw)
    except (PredictionsError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(result, indent=2) if as_json else format_report(result))


@data_app.command("inspect")
def data_inspect(overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides"),
                 preset: str = typer.Option("tiny"), stage: str = typer.Option("stage2"),
                 n: int = typer.Option(5, help="Records to show.")) -> None:
    """Show the first records a stage's adapter yields, validated (no Ray needed)."""
    from medvqa.data.adapters import iter_raw_records
    from medvqa.data.records import validate_record

    cfg = _load(preset, overrides)
    data = getattr(cfg, stage).data
    for i, raw in enumerate(iter_raw_records(data)):
        if i >= n:
            break
        rec = validate_record(raw)
        rec["image"] = f"<{len(rec['image'] or b'')} bytes>"
        typer.echo(json.dumps(rec, default=str))


@data_app.command("audit")
def data_audit(kind: str = typer.Option("vqa_rad", help="Source adapter (data.kind), e.g. vqa_rad, vqa_rad_hf, "
                                        "slake."),
               path: str = typer.Option(..., help="Dataset folder, parquet file or HF dataset id."),
               a: str = typer.Option("train", "--a", help="Training-side split."),
               b: str = typer.Option("test", "--b", help="Evaluation-side split."),
               disjoint: bool = typer.Option(False, "--disjoint", help="Audit an image-disjoint split of the "
                                             "records of both splits instead of the official one."),
               test_fraction: float = typer.Option(0.2, help="--disjoint: fraction of questions on the test side."),
               seed: int = typer.Option(0, help="--disjoint: split seed."),
               stratify: Optional[str] = typer.Option(None, help="--disjoint: stratify by this meta key "
                                                      "(e.g. organ)."),
               reference: Optional[str] = typer.Option(None, help="Folder of the original VQA-RAD release (JSON + "
                                                       "image folder): joined by image and question, it restores "
                                                       "the rephrasings and templated frames a derived split "
                                                       "dropped, so they count as linked rewrites."),
               as_json: bool = typer.Option(False, "--json", help="Print one machine-readable JSON object.")) -> None:
    """Leakage audit of a split: image overlap (by content hash) and near-duplicate questions (exact, linked by the
    dataset, lexical rewrites)."""
    from medvqa.audit import audit_splits, format_audit, image_disjoint_split
    from medvqa.config import DataConfig
    from medvqa.data.adapters import iter_raw_records
    from medvqa.data.records import valid_records

    def load(split: str, kind: str = kind, path: str = path) -> tuple[list, int]:
        # the image hash (image_id) is all the audit needs
        valid, rejected = valid_records(iter_raw_records(DataConfig(kind=kind, path=path, split=split)), False)
        return valid, len(rejected)

    try:
        (rows_a, rej_a), (rows_b, rej_b) = load(a), load(b)
        ref_rows = load("all", "vqa_rad", reference)[0] if reference else []
        if disjoint:
            rows_a, rows_b = image_disjoint_split(rows_a + rows_b, test_fraction=test_fraction, seed=seed,
                                                  stratify_by=stratify, names=(a, b))
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    result = audit_splits(rows_a, rows_b, name_a=a, name_b=b, reference=ref_rows)
    result["data"] = {"kind": kind, "path": path, "split": "image_disjoint" if disjoint else "official",
                      "rejected": {a: rej_a, b: rej_b}, "reference": reference}
    if disjoint:
        result["data"].update(test_fraction=test_fraction, seed=seed, stratify_by=stratify)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    what = (f"image-disjoint split (test_fraction={test_fraction}, seed={seed}, stratify_by={stratify})"
            if disjoint else "official split")
    typer.echo(f"{kind} at {path}: {what}; rejected records left out: {a} {rej_a}, {b} {rej_b}\n")
    typer.echo(format_audit(result))


@app.command()
def report(run_dir: str = typer.Argument(..., help="Run directory with eval/metrics.json (after `medvqa eval`)."),
           audit: bool = typer.Option(True, help="VQA-RAD runs: compute the train/test leakage audit.")) -> None:
    """Write RUN_DIR/report/report.md and report.html (tables, plots, leakage, provenance, human scores)."""
    from medvqa.report import HumanEvalError, build_report

    try:
        out = build_report(run_dir, audit=audit)
    except (FileNotFoundError, HumanEvalError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    from medvqa.runs import RunDir
    from medvqa.tracking import log_artifacts

    log_artifacts(run_dir, RunDir(run_dir).report, "report")  # to the run's MLflow run, when it is tracked
    typer.echo(json.dumps(out))


@app.command("human-export")
def human_export(run_dir: str = typer.Argument(..., help="Run directory with eval/predictions/."),
                 out_csv: str = typer.Argument(..., help="CSV to write for the clinician."),
                 images: bool = typer.Option(True, help="Resolve test images (written next to the CSV).")) -> None:
    """Export the open (non-yes/no) questions of every cell for clinician scoring (empty clinician_score)."""
    from medvqa.report import export_human_eval

    try:
        df = export_human_eval(run_dir, out_csv, resolve_images=images)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(df)} rows -> {out_csv}")


@app.command("human-merge")
def human_merge(run_dir: str = typer.Argument(..., help="Run directory."),
                filled_csv: str = typer.Argument(..., help="The exported CSV with clinician_score filled in.")) -> None:
    """Validate a filled human-evaluation CSV and store it for `medvqa report`."""
    from medvqa.report import HumanEvalError, merge_human_eval

    try:
        summary = merge_human_eval(run_dir, filled_csv)
    except (FileNotFoundError, HumanEvalError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(summary, indent=2))


@sweep_app.command("run")
def sweep_run(overrides: Optional[List[str]] = typer.Argument(None, help="Dotted config overrides for every trial, "
                                                              "e.g. stage1.data.path=/data/roco"),
              preset: str = typer.Option("tiny", help="Search space: tune/<preset>.yaml, or a YAML path."),
              num_samples: Optional[int] = typer.Option(None, help="Trials (default: the space's num_samples)."),
              max_concurrent: Optional[int] = typer.Option(None, help="Trials at once (default: the space's, or "
                                                                      "derived from the cluster's GPUs/CPUs)."),
              report: bool = typer.Option(True, help="Write the sweep report at the end.")) -> None:
    """Run a sweep; the same command continues an interrupted one (same as `python tune/sweep.py`)."""
    from medvqa.config import ConfigError
    from medvqa.sweep import load_space

    changes = {k: v for k, v in (("num_samples", num_samples), ("max_concurrent", max_concurrent)) if v is not None}
    try:
        space = load_space(preset, changes, overrides or [])
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2)
    setup_logging()
    from medvqa.sweep import run_sweep

    typer.echo(f"sweep dir: {run_sweep(space, report=report)}")


@sweep_app.command("report")
def sweep_report(sweep_dir: str = typer.Argument(..., help="Sweep directory (sweeps/<name>-<hash>).")) -> None:
    """Write SWEEP_DIR/report/: trials.csv, report.md/.html, curve.png, importance, best.yaml (a preset)."""
    from medvqa.sweep_report import write_report

    try:
        out = write_report(sweep_dir)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(out))


@model_app.command("build")
def model_build(out: str = typer.Option(..., help="Folder to write (save_pretrained: config, weights, tokenizer, "
                                        "processor); then model.name_or_path=OUT loads it."),
                shape: str = typer.Option("idefics2-8b", help="Architecture: idefics2-8b or tiny."),
                text_layers: Optional[int] = typer.Option(None, help="Text decoder layers (full shape: 32)."),
                vision_layers: Optional[int] = typer.Option(None, help="Vision encoder layers (full shape: 27)."),
                perceiver_depth: Optional[int] = typer.Option(None, help="Perceiver resampler layers (full: 3)."),
                seed: int = typer.Option(0, help="Weight and tokenizer seed."),
                dtype: str = typer.Option("bfloat16", help="dtype of the saved weights: bfloat16 or float32."),
                device: str = typer.Option("cpu", help="Where to initialise the weights (cuda: faster; the full "
                                           "shape needs ~17 GB there).")) -> None:
    """Write a randomly initialised model of a real checkpoint's architecture (idefics2-8b: Mistral-7B text model,
    SigLIP at 980 px, 64-latent perceiver; 32,003-token tokenizer) and print the full shape's parameter count."""
    from medvqa.shapes import build

    try:
        info = build(shape, out, text_layers=text_layers, vision_layers=vision_layers,
                     perceiver_depth=perceiver_depth, seed=seed, dtype=dtype, device=device)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{shape}: full shape {info['full_shape_parameters']:,} parameters; written {info['parameters']:,} "
               f"({info['dtype']}) to {info['path']} in {info['seconds']} s")
    typer.echo(json.dumps(info))


if __name__ == "__main__":
    app()
