"""A calm terminal: one progress bar per training stage and evaluation pass, our own log lines, nothing else.

``calm(log_path)`` routes everything a process prints (``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2:
Ray's execution plans, the worker output Ray forwards to the driver, checkpoint paths, C++ warnings, tracebacks) and
every log record to ``log_path``, and shows on the terminal only the ``medvqa.*`` log lines, errors, and the progress
bars of a ``Console``. ``verbose=True``
leaves the terminal as it is (everything shows) and also writes the log records to ``log_path``.

Progress crosses processes through Ray, not through worker stdout: the rank-0 Train worker ``publish``es each
metrics.jsonl record (fire and forget) to a small named actor, ``ProgressBoard``, owned by the driver, which a
``BoardWatcher`` thread polls to draw the bars. That works across nodes and does not depend on where the run directory
lives.

On a terminal a bar is redrawn in place; elsewhere (a ``ray job submit`` log, a pipe) it prints a line at every tenth
of the stage and at least every ``every_s`` seconds, so a log stays short.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Mapping

log = logging.getLogger("medvqa.console")

BOARD_NAMESPACE = "medvqa"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOOKUP_RETRY_S = 5.0  # a worker that found no board looks again after this long (the driver may create it late)


# ---------------------------------------------------------------------------------------------------- rendering


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render(label: str, done: int, total: int | None, fields: Mapping[str, str] = (), eta_s: float | None = None,
           width: int = 24) -> str:
    """``stage1 [#########...............] 45/96  47% | loss 1.635 | 22.3 samples/s | ETA 0:00:51``."""
    if total:
        filled = min(width, int(width * done / total))
        head = f"{label:<7}[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {100 * done / total:3.0f}%"
    else:
        head = f"{label:<7}{done}"
    parts = [head, *(f"{v} {k}" if k.endswith("/s") else f"{k} {v}" for k, v in dict(fields).items())]
    if total and done < total:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def training_fields(record: Mapping) -> dict[str, str]:
    """What a training bar shows of a metrics.jsonl record: loss, samples/s, the last validation F1."""
    out = {}
    if isinstance(record.get("loss"), (int, float)):
        out["loss"] = f"{record['loss']:.3f}"
    if isinstance(record.get("samples_per_s"), (int, float)):
        out["samples/s"] = f"{record['samples_per_s']:.1f}"
    if isinstance(record.get("val_normalized_f1"), (int, float)):
        out["val F1"] = f"{record['val_normalized_f1']:.3f}"
    return out


class ProgressBar:
    """One bar on ``stream``. ETA from the rate seen by this process (a resumed stage starts its clock at the first
    update, not at step 0)."""

    def __init__(self, stream: IO[str], label: str, tty: bool, every_s: float = 60.0, clock=time.monotonic):
        self.stream, self.label, self.tty, self.every_s, self.clock = stream, label, tty, every_s, clock
        self.done, self.total, self.fields = 0, None, {}
        self._first: tuple[float, int] | None = None
        self._printed: tuple[float, int] | None = None  # (time, tenth) of the last line (not a tty)

    def eta(self) -> float | None:
        if self._first is None or not self.total:
            return None
        t0, d0 = self._first
        rate = (self.done - d0) / max(self.clock() - t0, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def text(self) -> str:
        return render(self.label, self.done, self.total, self.fields, self.eta())

    def update(self, done: int, total: int | None = None, fields: Mapping[str, str] = ()) -> None:
        self.done, self.total = int(done), total or self.total
        self.fields = {**self.fields, **dict(fields)}
        now = self.clock()
        if self._first is None:
            self._first = (now, self.done)
        if self.tty:
            self.draw()
            return
        tenth = int(10 * self.done / self.total) if self.total else 0
        if self._printed is None or tenth > self._printed[1] or now - self._printed[0] >= self.every_s:
            self.stream.write(self.text() + "\n")
            self.stream.flush()
            self._printed = (now, tenth)

    def draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.text())
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")

    def close(self, note: str = "") -> None:
        text = self.text() + (f" | {note}" if note else "")
        if self.tty:
            self.stream.write("\r\x1b[K" + text + "\n")
        elif self._printed is None or self._printed[1] < 10 or note:
            self.stream.write(text + "\n")
        self.stream.flush()


class Console:
    """The terminal of a calm session: log lines and at most one live bar (thread-safe; the watcher thread draws)."""

    def __init__(self, stream: IO[str], tty: bool | None = None, every_s: float = 60.0):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.bar: ProgressBar | None = None
        self.key: str | None = None
        self.finished: set[str] = set()
        self.lock = threading.RLock()

    def line(self, text: str) -> None:
        with self.lock:
            if self.bar:
                self.bar.clear()
            self.stream.write(text + "\n")
            if self.bar and self.tty:
                self.bar.draw()
            self.stream.flush()

    def progress(self, key: str, done: int, total: int | None, fields: Mapping[str, str] = ()) -> None:
        """Update bar ``key`` (its label; opening it, and closing another one, as needed); a finished key stays
        closed."""
        with self.lock:
            if key in self.finished:
                return
            if self.key != key:
                self.finish()
                self.bar, self.key = ProgressBar(self.stream, key, self.tty, self.every_s), key
            self.bar.update(done, total, fields)

    def finish(self, key: str | None = None, note: str = "") -> None:
        """Close bar ``key`` (default: whichever is open)."""
        with self.lock:
            if self.bar is None or (key is not None and key != self.key):
                if key is not None:
                    self.finished.add(key)
                return
            self.bar.close(note)
            self.finished.add(self.key)
            self.bar, self.key = None, None


class TerminalHandler(logging.Handler):
    """Log records for the terminal: ``medvqa.*`` at INFO and above, anything else from ERROR up."""

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        self.warn_format = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("medvqa") or record.levelno >= logging.ERROR

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fmt = self.warn_format if record.levelno >= logging.WARNING else self.formatter
            # Tracebacks stay in the log file: format a copy without them (the file handler caches exc_text).
            bare = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
            self.console.line(fmt.format(bare))
        except Exception:  # noqa: BLE001 -- logging must never raise
            self.handleError(record)


# ------------------------------------------------------------------------------------------------ the session

_current: Console | None = None


def current() -> Console | None:
    """The console of this process's calm session, if one is open (the evaluation draws its bar on it)."""
    return _current


def _ray_stream_handlers() -> list[logging.StreamHandler]:
    """Ray's loggers do not propagate to the root logger; their own handlers write to the stderr of the moment they
    were configured (when ray was imported)."""
    out = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.split(".")[0] == "ray" and isinstance(logger, logging.Logger):
            out += [h for h in logger.handlers if type(h) is logging.StreamHandler]
    return out


@contextmanager
def calm(log_path: str | Path, verbose: bool = False, terminal: IO[str] | None = None) -> Iterator[Console | None]:
    """Route this process's output and log records to ``log_path`` (appended, one header per session) and yield the
    ``Console`` of the terminal (``terminal``, default the process's stderr as it was); None with ``verbose``, which
    leaves the terminal as it is and only adds the log file.

    Output is redirected at the file-descriptor level too (fds 1 and 2): Ray's C++ core worker in the driver writes
    its warnings straight to fd 2, and child processes (a local Ray's raylet) inherit them."""
    global _current
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    root = logging.getLogger()
    saved = (sys.stdout, sys.stderr, root.level, root.handlers[:])
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT, datefmt="%H:%M:%S"))
    root.setLevel(logging.INFO)
    if verbose:
        root.addHandler(file_handler)
        try:
            yield None
        finally:
            root.setLevel(saved[2])
            root.handlers = saved[3]
            log_file.close()
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    own_terminal = terminal is None
    if own_terminal:
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    console = Console(terminal)
    ray_handlers = [(h, h.stream) for h in _ray_stream_handlers()]
    try:
        for fd in (1, 2):
            os.dup2(log_file.fileno(), fd)
        root.handlers = [file_handler, TerminalHandler(console)]
        sys.stdout = sys.stderr = log_file
        for handler, _ in ray_handlers:
            handler.setStream(log_file)
        _current = console
        yield console
    finally:
        console.finish()
        _current = None
        log_file.flush()
        for fd, saved_fd in saved_fds.items():
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
        sys.stdout, sys.stderr, level, handlers = saved
        root.setLevel(level)
        root.handlers = handlers
        for handler, stream in ray_handlers:
            handler.setStream(stream)
        if own_terminal:
            terminal.close()
        log_file.close()


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*|(Error|Exception|Interrupt|Exit))$")


def failure_summary(exc: BaseException) -> str:
    """The cause of a failure in a line or two: the exception's first line and, for errors that carry another
    process's traceback as text (Ray Train's worker errors), the exception line after that traceback's last frame."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    summary = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    frames = [i for i, line in enumerate(lines) if line.startswith('File "')]
    if frames:
        cause = next((line for line in lines[frames[-1] + 1:] if _EXCEPTION_LINE.match(line)), None)
        if cause and cause != lines[0]:
            summary += f"\n  cause: {cause}"
    return summary


# ---------------------------------------------------------------------------------- progress across processes


class ProgressBoard:
    """A Ray actor (``num_cpus=0``) holding the latest record of each stage; the rank-0 worker updates it, the
    driver's watcher reads it. ``seq`` orders updates and tells the watcher whether anything changed."""

    def __init__(self):
        self.seq = 0
        self.stages: dict[str, dict] = {}

    def update(self, record: dict) -> None:
        self.seq += 1
        stage = str(record.get("stage") or "run")
        self.stages[stage] = {**self.stages.get(stage, {}), **record, "seq": self.seq}

    def snapshot(self) -> tuple[int, dict]:
        return self.seq, self.stages


def board_name(run: str) -> str:
    return f"progress-{run}"


_handles: dict[str, tuple[object | None, float]] = {}  # run -> (board handle or None, when looked up)
_watchers: dict[str, "BoardWatcher"] = {}  # run -> the watcher drawing it in this process (the driver)


def publish(run: str, record: Mapping) -> None:
    """Send a record to the run's progress board without waiting (no board: nothing happens). Needs Ray. In the
    driver, whose watcher draws the run, the record is shown at once instead: a stage's end closes its bar before
    the driver's next log line."""
    watcher = _watchers.get(run)
    if watcher is not None:
        watcher.show_now(record)
        return
    import ray

    handle, when = _handles.get(run, (None, float("-inf")))
    if handle is None and time.monotonic() - when >= _LOOKUP_RETRY_S:
        try:
            handle = ray.get_actor(board_name(run), namespace=BOARD_NAMESPACE)
        except ValueError:  # no driver is watching this run
            handle = None
        _handles[run] = (handle, time.monotonic())
    if handle is not None:
        handle.update.remote(dict(record))


class BoardWatcher:
    """A driver thread that creates the run's ``ProgressBoard`` once Ray is up and draws its records as bars."""

    def __init__(self, console: Console, run: str, interval_s: float = 0.5):
        self.console, self.run, self.interval_s = console, run, interval_s
        self.board = None
        self.seq = 0
        self._lock = threading.Lock()  # the thread polls, the driver's own records arrive on the main thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medvqa-progress", daemon=True)

    def start(self) -> "BoardWatcher":
        _watchers[self.run] = self
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        _watchers.pop(self.run, None)
        try:
            self.poll()  # the last records before the bars close
        except Exception as e:  # noqa: BLE001 -- e.g. Ray already gone after a failure
            log.debug("last progress poll failed: %s", e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 -- a missed redraw is no reason to stop drawing
                log.debug("progress poll failed: %s", e)

    def poll(self) -> None:
        """Draw what the workers sent since the last poll (creating the board once Ray is up)."""
        from medvqa.telemetry import active

        if not active():
            return
        import ray

        with self._lock:
            if self.board is None:
                self.board = ray.remote(num_cpus=0)(ProgressBoard).options(
                    name=board_name(self.run), namespace=BOARD_NAMESPACE, get_if_exists=True).remote()
            seq, stages = ray.get(self.board.snapshot.remote(), timeout=30)
            if seq == self.seq:
                return
            self.seq = seq
            for stage, record in sorted(stages.items(), key=lambda kv: kv[1]["seq"]):
                self.show(str(stage), record)

    def show_now(self, record: Mapping) -> None:
        """A record of the driver itself: first the workers' latest (a stage's last step), then this one."""
        if record.get("event") == "end":
            self.poll()
        self.show(str(record.get("stage") or "run"), record)

    def show(self, stage: str, record: Mapping) -> None:
        if record.get("event") == "end":
            self.console.finish(stage)
        elif isinstance(record.get("total_steps"), int) and isinstance(record.get("step"), int):
            self.console.progress(stage, record["step"], record["total_steps"], training_fields(record))
