"""A tiny two-stage run with evaluation, observed the way a user would: the MLflow store (sqlite, no server), the
node's Prometheus endpoint that the Ray dashboard reads, and the terminal of the calm console."""

import io
import re
import threading
import time
import urllib.request

import pytest

from medvqa.config import load_config

pytestmark = pytest.mark.integration
pytest.importorskip("mlflow")

# One stage (a second TorchTrainer would add a minute; every stage goes through the same code) with two validation
# rounds, then the evaluation: 6 cells of 32 questions.
SMALL = ["stage2.data.num_records=32", "stage2.epochs=1", "stage2.data.validation_fraction=0.25",
         "stage2.validate_every_n_steps=3", "run.log_every_n_steps=1", "run.checkpoint_every_n_steps=100",
         "run.evaluate=true", "eval.conditions=true,swapped,expert", "resources.num_cpus=2", "run.tracking=mlflow"]
CELLS = 6  # base and single_stage x true, swapped, expert
SERIES = re.compile(r'^(ray_medvqa_\w+)\{(.*)\} (\S+)$')


def _scrape(url: str, seen: dict) -> None:
    """Every medvqa series on the endpoint -> seen[(name, run, stage)] = last value."""
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        m = SERIES.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            seen[m.group(1), labels.get("run"), labels.get("stage")] = float(m.group(3))


@pytest.fixture(scope="module")
def observed(ray_local, tmp_path_factory):
    import ray

    from medvqa.evaluate import evaluate_run
    from medvqa.observe import session
    from medvqa.train import run_two_stage

    tmp = tmp_path_factory.mktemp("observed")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config("tiny_single_stage", SMALL + [f"run.output_dir={tmp / 'runs'}", f"run.tracking_uri={store}"])
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    seen: dict = {}
    stop = threading.Event()

    def scrape_during_the_run():  # as Prometheus would: gauges show the latest value while the run goes on
        while not stop.wait(2.0):
            try:
                _scrape(url, seen)
            except OSError:
                pass

    scraper = threading.Thread(target=scrape_during_the_run, daemon=True)
    scraper.start()
    terminal = io.StringIO()
    with session(cfg, "train", preset="tiny_single_stage", terminal=terminal) as rd:  # as `medvqa train` does
        evaluate_run(run_two_stage(cfg))
    stop.set()
    scraper.join()
    for _ in range(30):  # the driver's last evaluation batches reach the endpoint at Ray's next export (~10 s)
        _scrape(url, seen)
        if seen.get(("ray_medvqa_cells_done_total", rd.name, "eval")) == CELLS:
            break
        time.sleep(2.0)
    return cfg, rd, store, terminal.getvalue(), seen


def test_mlflow_has_the_params_the_step_curve_the_validation_rounds_and_the_evaluation(observed):
    from mlflow import MlflowClient

    from medvqa.tracking import read_session

    cfg, rd, store, _, _ = observed
    client = MlflowClient(tracking_uri=store)
    session = read_session(rd)
    assert session["uri"] == store
    run = client.get_run(session["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == rd.name
    assert run.data.params["lora.r"] == str(cfg.lora.r) and run.data.tags["medvqa.preset"] == "tiny_single_stage"
    history = client.get_metric_history(run.info.run_id, "stage2/loss")  # logged by the rank-0 Train worker
    steps = [m.step for m in history]
    assert len(steps) >= 4 and steps == list(range(1, len(steps) + 1))
    assert "stage2/samples_per_s" in run.data.metrics and "stage2/tokens_per_s" in run.data.metrics
    rounds = client.get_metric_history(run.info.run_id, "stage2/val_normalized_f1")
    assert [m.step for m in rounds] == sorted({*range(3, len(steps) + 1, 3), len(steps)})
    assert run.data.metrics["stage2/records"] > 0 and run.data.metrics["stage2/rejected"] == 0
    for model in ("base", "single_stage"):
        for condition in ("true", "swapped", "expert"):
            assert f"eval/{model}/{condition}/normalized_em" in run.data.metrics, (model, condition)
    assert "eval/single_stage/image_reliance/normalized_em" in run.data.metrics


def test_the_nodes_metrics_endpoint_serves_training_and_evaluation_metrics(observed):
    _, rd, _, _, seen = observed
    for name, stage in (("ray_medvqa_samples_per_s", "stage2"), ("ray_medvqa_tokens_per_s", "stage2"),
                        ("ray_medvqa_loss", "stage2"), ("ray_medvqa_step", "stage2"),
                        ("ray_medvqa_validation", "stage2"), ("ray_medvqa_records", "stage2"),
                        ("ray_medvqa_rejected_records", "stage2"), ("ray_medvqa_questions_per_s", "eval")):
        assert (name, rd.name, stage) in seen, (name, stage, sorted(seen))
    assert seen["ray_medvqa_samples_per_s", rd.name, "stage2"] > 0
    # Ray's Prometheus export names a counter <name>_total.
    assert seen["ray_medvqa_cells_done_total", rd.name, "eval"] == CELLS
    assert seen["ray_medvqa_questions_answered_total", rd.name, "eval"] == CELLS * 32  # 32 test questions a cell


def test_the_terminal_shows_bars_and_our_lines_and_the_log_has_the_rest(observed):
    _, rd, _, shown, _ = observed
    lines = shown.splitlines()
    assert len(lines) <= 30, shown
    for label in ("stage2", "eval"):
        assert any(line.startswith(label) and "]" in line for line in lines), (label, shown)
    assert not any("RayTrainWorker" in line or "Execution plan" in line for line in lines), shown
    log = (rd.logs / "train.log").read_text()
    assert "RayTrainWorker" in log and "Execution plan" in log
