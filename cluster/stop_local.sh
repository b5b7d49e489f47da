#!/usr/bin/env bash
# Stop the local Ray cluster started by cluster/start_local.sh (the one whose temp dir is $RAY_TMPDIR/ray, default
# <repo>/runs/.ray/ray), and only that one.
#
#   cluster/stop_local.sh             # SIGTERM its processes, SIGKILL what is left after GRACE seconds (default 10)
#   STOP_ALL=1 cluster/stop_local.sh  # plain `ray stop`: every Ray process on this machine, other users' included
#
# Why not plain `ray stop`: it kills Ray processes by name machine-wide, including other clusters and the ray.init()
# clusters of test runs (see cluster/_procs.py). Running jobs are killed with the cluster; re-submitting the same
# command later resumes them from their last checkpoint (run ids are deterministic).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO/.venv/bin/ray" ]]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi
if [[ "${STOP_ALL:-0}" == "1" ]]; then
  exec ray stop
fi
PYTHON="$(dirname "$(command -v ray 2>/dev/null || command -v python3)")/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

TMP_ROOT="${RAY_TMPDIR:-$REPO/runs/.ray}"
if [[ ! -d "$TMP_ROOT" ]]; then
  echo "no local cluster state in $TMP_ROOT: nothing to stop"
  exit 0
fi
TMP_ROOT="$(cd "$TMP_ROOT" && pwd)"
"$PYTHON" "$REPO/cluster/_procs.py" stop "$TMP_ROOT/ray" --grace "${GRACE:-10}"
rm -f "$TMP_ROOT/cluster.env"
