"""Find and stop the processes of ONE local Ray cluster, identified by its temp dir (used by start/stop_local.sh).

Why not ``ray stop``: it terminates every Ray process of the machine by name (``ray stop`` matches ``raylet``,
``gcs_server``, ``default_worker.py``, … in any process), including other users' clusters and the ``ray.init()``
clusters of tests running in parallel. This helper stops only the processes that belong to the cluster started
with ``--temp-dir <temp_dir>``:

- Ray daemons whose command line names the temp dir (gcs_server, raylet, dashboard, monitor, log_monitor);
- the Ray Client server, whose command line names the cluster's GCS address instead (``ray_current_cluster``);
- all their descendants (workers ``ray::IDLE``/``ray::<task>``, the dashboard and runtime-env agents, job
  supervisors and job drivers), found by process tree since setproctitle hides their arguments.

    python cluster/_procs.py running <temp_dir>     # exit 0 when the cluster's GCS is alive, else 1
    python cluster/_procs.py list <temp_dir>        # pid and command of every process of the cluster
    python cluster/_procs.py stop <temp_dir> [--grace 10]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psutil


def _is_ray_daemon(cmd: list[str]) -> bool:
    exe = os.path.basename(cmd[0]) if cmd else ""
    line = " ".join(cmd)
    return exe in ("gcs_server", "raylet") or "site-packages/ray/" in line or "-m ray." in line or " ray." in line


def _bootstrap_address(temp_dir: Path) -> str | None:
    try:
        return (temp_dir / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def cluster_processes(temp_dir: str | Path) -> list[psutil.Process]:
    """The cluster's root daemons and all their descendants (never this process or its ancestors)."""
    temp_dir = Path(temp_dir).resolve()
    marker = str(temp_dir) + "/"
    address = _bootstrap_address(temp_dir)
    me = psutil.Process()
    exclude = {me.pid, *(p.pid for p in me.parents())}
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["pid"] in exclude or not _is_ray_daemon(cmd):
            continue
        line = " ".join(cmd)
        owns_dir = marker in line or line.rstrip().endswith(str(temp_dir))
        client_server = address is not None and "ray.util.client.server" in line and f"--address={address}" in line
        if owns_dir or client_server:
            roots.append(proc)
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                if p.pid not in exclude:
                    found[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return "?"


def gcs_alive(temp_dir: str | Path) -> bool:
    for p in cluster_processes(temp_dir):
        try:
            if p.name() == "gcs_server" and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def _signal(procs: list[psutil.Process], grace: float) -> list[psutil.Process]:
    """SIGTERM ``procs``, wait up to ``grace`` s, SIGKILL survivors; return the ones that needed SIGKILL."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return alive


def stop(temp_dir: str | Path, grace: float = 10.0) -> int:
    """Stop the cluster in ``ray stop``'s order: raylet first (its workers and agents fate-share with it), then the
    other daemons, the GCS last; each bucket gets SIGTERM and, after ``grace / 3`` s, SIGKILL. Returns how many
    processes there were."""
    procs = cluster_processes(temp_dir)
    if not procs:
        return 0
    buckets = [[p for p in procs if _name(p) == "raylet"],
               [p for p in procs if _name(p) not in ("raylet", "gcs_server")],
               [p for p in procs if _name(p) == "gcs_server"]]
    killed = []
    for bucket in buckets:
        if bucket:
            killed += _signal(bucket, grace / len(buckets))
    if killed:
        print(f"{len(killed)} processes ignored SIGTERM and were killed: "
              f"{', '.join(sorted({_name(p) for p in killed}))}")
    return len(procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["running", "list", "stop"])
    ap.add_argument("temp_dir")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    args = ap.parse_args(argv)
    if args.command == "running":
        return 0 if gcs_alive(args.temp_dir) else 1
    if args.command == "list":
        for p in cluster_processes(args.temp_dir):
            try:
                print(p.pid, " ".join(p.cmdline())[:160])
            except psutil.NoSuchProcess:
                pass
        return 0
    n = stop(args.temp_dir, args.grace)
    print(f"stopped {n} Ray processes of the cluster in {args.temp_dir}" if n else
          f"no Ray processes of a cluster in {args.temp_dir} were running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
