"""The calm console: bars, what reaches the terminal and what goes to the run log, and how a failure is reported."""

import io
import logging
import os
import sys

import pytest

from medvqa import console
from medvqa.config import load_config
from medvqa.observe import session


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_render_shows_step_total_fields_and_eta():
    text = console.render("stage1", 45, 96, {"loss": "1.635", "samples/s": "22.3"}, eta_s=51)
    assert text == "stage1 [###########.............] 45/96  47% | loss 1.635 | 22.3 samples/s | ETA 0:00:51"
    assert "ETA" not in console.render("stage1", 96, 96)
    assert console.format_duration(3725) == "1:02:05" and console.format_duration(None) == "?"


def test_a_bar_off_a_terminal_prints_a_line_per_tenth_and_its_eta_comes_from_the_rate_seen():
    out, clock = io.StringIO(), Clock()
    bar = console.ProgressBar(out, "stage2", tty=False, every_s=1e9, clock=clock)
    for step in range(20, 101):  # a resumed stage: the first update is step 20
        clock.t = step - 20.0  # one step per second
        bar.update(step, 100, {"loss": "1.0"})
        if step == 60:
            assert bar.eta() == pytest.approx(40.0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split("]")[1].split("|")[0].strip() for line in lines] == [
        f"{s}/100 {s:3d}%" for s in (20, 30, 40, 50, 60, 70, 80, 90, 100)]


def test_log_lines_on_a_terminal_clear_and_redraw_the_bar():
    out = io.StringIO()
    con = console.Console(out, tty=True)
    con.progress("stage1", 1, 4, {"loss": "2.000"})
    con.line("12:00:00 [stage1] validation ...")
    con.progress("stage2", 1, 2)  # another stage: stage1's bar is closed on its own line
    con.finish()
    text = out.getvalue()
    assert "\r\x1b[K12:00:00 [stage1] validation ...\n\r\x1b[Kstage1 [" in text
    assert text.count("\n") == 3 and text.endswith("1/2  50% | ETA ?\n")


def test_calm_routes_ray_and_print_output_to_the_log_and_our_lines_to_the_terminal(tmp_path):
    ray_logger = logging.getLogger("ray.data.fake")  # as Ray configures its loggers: own handler, no propagation
    ray_handler = logging.StreamHandler(sys.stderr)
    ray_logger.addHandler(ray_handler)
    ray_logger.propagate = False
    terminal, log_path = io.StringIO(), tmp_path / "logs" / "train.log"
    try:
        with console.calm(log_path, terminal=terminal):
            print("(RayTrainWorker pid=1) Checkpoint successfully created at: ...")
            print("Execution plan of Dataset train_1: InputDataBuffer[Input] -> ...", file=sys.stderr)
            os.write(2, b"[2026-11-30 09:43:06,460 E 18805] core_worker.cc:2465: Actor ...\n")  # C++, straight to fd 2
            ray_logger.warning("Progress bars disabled.")
            logging.getLogger("medvqa.train").info("[stage1] data: 192 valid, 0 rejected")
            logging.getLogger("some.library").info("Running upgrade")
            logging.getLogger("some.library").error("something broke")
        assert ray_handler.stream is sys.stderr  # restored
    finally:
        ray_logger.removeHandler(ray_handler)
        ray_logger.propagate = True
    shown = terminal.getvalue().splitlines()
    assert len(shown) == 2 and shown[0].endswith(" [stage1] data: 192 valid, 0 rejected")
    assert shown[1].endswith(" ERROR something broke")
    logged = log_path.read_text()
    for text in ("Checkpoint successfully created", "Execution plan of Dataset", "Progress bars disabled",
                 "core_worker.cc", "[stage1] data: 192 valid", "Running upgrade"):
        assert text in logged, text


def test_failure_summary_finds_the_cause_inside_a_worker_traceback():
    worker_error = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "/x/ray/train/v2/_internal/execution/worker_group/thread_runner.py", line 44, in _run_target\n'
        "    result = target()\n"
        '  File "/x/medvqa/train.py", line 190, in train_fn_per_worker\n'
        "    loss = ddp_model(**batch).loss\n"
        "           ^^^^^^^^^^^^^^^^^^\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n\n"
        "See the worker logs for more.")
    assert console.failure_summary(worker_error) == (
        "RuntimeError: Training failed due to worker errors:\n"
        "  cause: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert console.failure_summary(ValueError("bad path")) == "ValueError: bad path"


def test_a_failing_session_prints_its_cause_and_the_log_path_and_keeps_the_traceback_in_the_log(tmp_path):
    cfg = load_config("tiny", [f"run.output_dir={tmp_path}"])
    terminal = io.StringIO()
    with pytest.raises(FileNotFoundError):
        with session(cfg, "train", terminal=terminal) as rd:
            raise FileNotFoundError("stage 2 needs the stage-1 adapter at /nowhere")
    shown = terminal.getvalue().splitlines()
    log_path = rd.logs / "train.log"
    assert shown[-2].endswith("ERROR error: FileNotFoundError: stage 2 needs the stage-1 adapter at /nowhere")
    assert shown[-1] == f"full log: {log_path}"
    assert "Traceback" not in terminal.getvalue() and "Traceback (most recent call last)" in log_path.read_text()
    assert len(shown) == 3  # the run line, the cause, the log


def test_verbose_leaves_the_terminal_alone_and_still_writes_the_log(tmp_path, capsys):
    cfg = load_config("tiny", [f"run.output_dir={tmp_path}", "run.verbose=true"])
    with session(cfg, "train") as rd:
        print("ray output")
        logging.getLogger("medvqa.train").info("our line")
    assert "ray output" in capsys.readouterr().out
    assert "our line" in (rd.logs / "train.log").read_text()


def test_the_drivers_stage_end_closes_the_bar_before_its_next_log_line(monkeypatch):
    from medvqa import telemetry

    monkeypatch.setattr(telemetry, "active", lambda: False)  # no Ray here: the watcher has no board to poll
    out = io.StringIO()
    con = console.Console(out, tty=True)
    watcher = console.BoardWatcher(con, "tiny-abc").start()
    try:
        watcher.show("stage1", {"stage": "stage1", "step": 10, "total_steps": 10, "loss": 0.5})  # the worker's last
        console.publish("tiny-abc", {"stage": "stage1", "event": "end"})  # the driver, after trainer.fit()
        con.line("12:00:00 done")
    finally:
        watcher.stop()
    bar = "stage1 [########################] 10/10 100% | loss 0.500"
    assert out.getvalue() == f"\r\x1b[K{bar}\r\x1b[K{bar}\n12:00:00 done\n"  # closed, then the line
