#!/usr/bin/env bash
# Start a single-node Ray cluster on this machine for `ray job submit`, with token authentication ON.
#
#   cluster/start_local.sh                      # all CPUs; GCS :6379, dashboard/jobs http://127.0.0.1:8265
#   NUM_CPUS=2 cluster/start_local.sh           # e.g. a 2-core laptop (see GUIDE §5: keep fractional CPUs per worker)
#   source cluster/env.sh                       # client settings printed below (auth mode, job server address)
#   cluster/stop_local.sh
#
# Environment knobs (all optional):
#   NUM_CPUS              CPUs Ray may schedule (default: all)
#   NUM_GPUS              GPUs Ray may schedule (default: Ray autodetects)
#   RAY_TMPDIR            root of Ray's temp dir; the cluster uses $RAY_TMPDIR/ray (default: <repo>/runs/.ray).
#                         Keep it short: Ray's unix sockets live under it and socket paths are limited to 107 chars.
#   GCS_PORT              GCS port (default 6379)
#   DASHBOARD_PORT        dashboard + job-submission HTTP port, bound to 127.0.0.1 (default 8265)
#   CLIENT_PORT           Ray Client server port (default 10001)
#   DASHBOARD_AGENT_PORT  per-node dashboard agent HTTP port (default 52365)
#   MEDVQA_RUNS_BASE      where jobs put a relative run.output_dir (default: this checkout, so runs land in ./runs)
#
# Idempotent: when this checkout's cluster (same temp dir) is already running it says so and prints the settings.
#
# What "local" means with Ray 2.60 (measured): the dashboard/job API listens on 127.0.0.1 only, but the GCS, raylet,
# object manager and Ray Client ports listen on all interfaces, and `--node-ip-address=127.0.0.1` is rewritten by
# Ray to the machine's routable IP. Token authentication is what keeps other hosts out: every gRPC and HTTP call
# needs the token in ~/.ray/auth_token.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$REPO/cluster"

# The Ray CLI and Python of the project's venv when there is one. Its bin dir goes first on PATH for `ray start`:
# job entry points (`python jobs/two_stage.py`) run with the PATH of the process that started the cluster.
if [[ -x "$REPO/.venv/bin/ray" ]]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi
if ! command -v ray >/dev/null 2>&1; then
  echo "error: the 'ray' CLI is not on PATH (activate the venv: source .venv/bin/activate; pip install -e .)" >&2
  exit 1
fi
RAY_BIN_DIR="$(dirname "$(command -v ray)")"
export PATH="$RAY_BIN_DIR:$PATH"
PYTHON="$RAY_BIN_DIR/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

TMP_ROOT="${RAY_TMPDIR:-$REPO/runs/.ray}"
mkdir -p "$TMP_ROOT"
TMP_ROOT="$(cd "$TMP_ROOT" && pwd)"
TEMP_DIR="$TMP_ROOT/ray"
GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
DASHBOARD_AGENT_PORT="${DASHBOARD_AGENT_PORT:-52365}"
STATE="$TMP_ROOT/cluster.env"
LOG="$TMP_ROOT/start.log"

# session dirs are ~40 chars and "/sockets/plasma_store" 21 more; AF_UNIX paths must stay under 108 bytes.
if (( ${#TEMP_DIR} > 45 )); then
  echo "error: Ray temp dir '$TEMP_DIR' is too long for unix socket paths (> 45 chars);" \
       "set a short RAY_TMPDIR, e.g. RAY_TMPDIR=/tmp/medvqa-ray $0" >&2
  exit 1
fi

print_settings() {
  cat <<EOF

Clients need (or just: source cluster/env.sh):
  export RAY_AUTH_MODE=token
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT}
  # the token is read from ~/.ray/auth_token (override: RAY_AUTH_TOKEN_PATH=<file> or RAY_AUTH_TOKEN=<token>)
  # do NOT set RAY_ADDRESS to the http URL: ray status / ray.init() reject it; GCS address: 127.0.0.1:${GCS_PORT}

Dashboard (loopback only; from another machine: ssh -L ${DASHBOARD_PORT}:127.0.0.1:${DASHBOARD_PORT} <this host>):
  http://127.0.0.1:${DASHBOARD_PORT}    (the browser asks for the token: ray get-auth-token)

Status:      ray status --address 127.0.0.1:${GCS_PORT}
Submit:      ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/two_stage.py
Follow/stop: ray job logs -f <submission id>;  ray job status <id>;  ray job stop <id>;  ray job list
Runs land in: ${MEDVQA_RUNS_BASE:-$REPO}/runs/<run id>/ (relative run.output_dir; set an absolute one to change it)
Stop:        cluster/stop_local.sh
EOF
}

if "$PYTHON" "$HERE/_procs.py" running "$TEMP_DIR"; then
  if [[ -f "$STATE" ]]; then   # the ports it was started with
    source "$STATE"
    DASHBOARD_PORT="${RAY_API_SERVER_ADDRESS##*:}"
    GCS_PORT="${MEDVQA_RAY_GCS_ADDRESS##*:}"
  fi
  echo "Ray is already running for this checkout (temp dir $TEMP_DIR, GCS $(cat "$TEMP_DIR/ray_current_cluster" 2>/dev/null))."
  print_settings
  exit 0
fi

port_busy() { "$PYTHON" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT leftovers of a stopped cluster are fine
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(0)   # busy
finally:
    s.close()
sys.exit(1)
EOF
}
for spec in "GCS_PORT=$GCS_PORT" "DASHBOARD_PORT=$DASHBOARD_PORT" "CLIENT_PORT=$CLIENT_PORT" \
            "DASHBOARD_AGENT_PORT=$DASHBOARD_AGENT_PORT"; do
  # Ray reserves 10002-19999 for worker processes and refuses fixed ports inside that range.
  if (( ${spec#*=} >= 10002 && ${spec#*=} <= 19999 )); then
    echo "error: ${spec} is inside Ray's worker port range 10002-19999; pick a port outside it" >&2
    exit 1
  fi
done
for spec in "GCS_PORT=$GCS_PORT" "DASHBOARD_PORT=$DASHBOARD_PORT" "CLIENT_PORT=$CLIENT_PORT" \
            "DASHBOARD_AGENT_PORT=$DASHBOARD_AGENT_PORT"; do
  if port_busy "${spec#*=}"; then
    echo "error: port ${spec#*=} is in use (another Ray cluster or ray.init()?); choose another, e.g." \
         "${spec%%=*}=$(( ${spec#*=} + 1 )) $0" >&2
    exit 1
  fi
done

# Token authentication. `ray start --head` enables it when RAY_AUTH_MODE is unset *and* a token exists, and
# silently starts WITHOUT auth when no token exists; so make sure the token exists and set the mode explicitly
# (then a missing token is an error instead of an open cluster).
if [[ -n "${RAY_AUTH_MODE:-}" && "${RAY_AUTH_MODE}" != "token" ]]; then
  echo "warning: ignoring RAY_AUTH_MODE=${RAY_AUTH_MODE}; this cluster always uses token authentication" >&2
fi
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
  ray get-auth-token --generate >/dev/null   # writes ~/.ray/auth_token (stdout would be the token itself)
  chmod 600 "$HOME/.ray/auth_token"          # Ray creates it world-readable
  echo "generated a new Ray auth token in ~/.ray/auth_token"
fi

export MEDVQA_RUNS_BASE="${MEDVQA_RUNS_BASE:-$REPO}"   # inherited by job drivers: relative runs/ -> the checkout

args=(--head --node-ip-address=127.0.0.1 --port="$GCS_PORT"
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
      --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT"
      --temp-dir="$TEMP_DIR" --disable-usage-stats)
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus="$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus="$NUM_GPUS")

echo "starting Ray: ray start ${args[*]}"
if ! ray start "${args[@]}" >"$LOG" 2>&1; then
  echo "error: ray start failed; its output ($LOG):" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi

cat >"$STATE" <<EOF
# written by cluster/start_local.sh; sourced by cluster/env.sh
export RAY_AUTH_MODE=token
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export MEDVQA_RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT
EOF

echo "Ray $(ray --version | awk '{print $NF}') started: GCS $(cat "$TEMP_DIR/ray_current_cluster"), temp dir $TEMP_DIR," \
     "CPUs ${NUM_CPUS:-all}, token auth on (log: $LOG)"
print_settings
