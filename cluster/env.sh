# Client settings for the Ray cluster started by cluster/start_local.sh. Source it, don't run it:
#
#   source cluster/env.sh
#   ray status --address "$MEDVQA_RAY_GCS_ADDRESS"
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/two_stage.py
#
# What Ray 2.60 clients need (verified):
#   RAY_AUTH_MODE=token      the cluster requires the token; without this, `ray status`, `ray job …` and ray.init()
#                            fail with "AuthenticationError: … InvalidAuthToken … RAY_AUTH_MODE is currently
#                            'disabled'". The token itself is read from ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH /
#                            RAY_AUTH_TOKEN); a remote client needs a copy of the cluster's token.
#   RAY_API_SERVER_ADDRESS   where `ray job` talks to (the dashboard's HTTP API). Not RAY_ADDRESS=http://…: that
#                            breaks `ray status` ("Invalid address format") and ray.init() ("Invalid Ray address").
# RAY_ADDRESS is deliberately NOT exported: with it set, every ray.init() in this shell (pytest included) would
# attach to the cluster, and ray.init(num_cpus=…) then fails. For a driver that should attach, pass it per command:
#   RAY_ADDRESS=$MEDVQA_RAY_GCS_ADDRESS python jobs/two_stage.py
# Ports follow what start_local.sh used (its state file), else the defaults (GCS 6379, dashboard 8265).

_medvqa_repo="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
_medvqa_state="${RAY_TMPDIR:-$_medvqa_repo/runs/.ray}/cluster.env"
if [ -f "$_medvqa_state" ]; then
  . "$_medvqa_state"
else
  export RAY_AUTH_MODE=token
  export RAY_API_SERVER_ADDRESS="http://127.0.0.1:${DASHBOARD_PORT:-8265}"
  export MEDVQA_RAY_GCS_ADDRESS="127.0.0.1:${GCS_PORT:-6379}"
fi
if ! command -v ray >/dev/null 2>&1 && [ -x "$_medvqa_repo/.venv/bin/ray" ]; then
  export PATH="$_medvqa_repo/.venv/bin:$PATH"
fi
unset _medvqa_repo _medvqa_state
