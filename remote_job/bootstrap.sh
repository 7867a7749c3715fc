#!/usr/bin/env bash
# ftplan bootstrap: runs inside the unpacked run dir on the GPU machine.
#
#   bash bootstrap.sh [--remote-python PATH] [--deadline-s N] [--shutdown arm|dry-run|off] [--plan]
#
# The SSH runner starts it detached (setsid nohup ... >> train.log 2>&1 < /dev/null &) so a dropped
# connection does not kill training. It
#   1. writes its PID (= process group id) to ./pid and, whatever happens, ./exit_code at the end;
#   2. arms the run's deadline so the machine ends itself even if the launcher dies: `shutdown -h +MIN`
#      on VMs; `runpodctl stop pod $RUNPOD_POD_ID` on RunPod (a container cannot shut down); when neither
#      works, a watchdog that stops the job (--shutdown off or FTPLAN_NO_SHUTDOWN=1: never; dry-run: log);
#   3. loads ./secrets.env (0600) into the environment; secrets never appear on a command line;
#   4. picks Python: --remote-python, else a venv built by uv (pip as the fallback; no python3-venv
#      needed) on the image's Python found through a login shell (conda, /opt), with the image's torch
#      when it is a CUDA build >= 2.6 that sees the GPU, else the PyTorch CUDA wheel matched to the
#      driver and GPU (job/torch_select.py); `--plan` prints that decision as JSON and installs nothing;
#      while it installs, the base model's weights download in the background (job/fetch_weights.py, started
#      as soon as huggingface_hub is in the venv; the job loads them from the same Hub cache), and on a machine
#      whose `nvidia-smi -L` lists a GPU, requirements-cuda.txt (Liger) is installed too (a failure there
#      only warns: the job falls back to its chunked loss);
#   5. records its timings (env_s, the download's, ready_s) in .ftplan-bootstrap.json for the job's
#      summary.json, runs `job/train.py --config job.json` and exits with its status.
set -uo pipefail

RUN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$RUN_DIR" || exit 97

log() { printf '[ftplan-bootstrap %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
# In a run dir the job's modules are in job/; in the repo (bootstrap.sh --plan) they sit beside this script.
TS="job/torch_select.py"
[ -f "$TS" ] || TS="$RUN_DIR/torch_select.py"

REMOTE_PYTHON=""
DEADLINE_S=""
SHUTDOWN_MODE="arm"
PLAN_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --remote-python) REMOTE_PYTHON="${2:?--remote-python needs a path}"; shift 2 ;;
    --deadline-s) DEADLINE_S="${2:?--deadline-s needs seconds}"; shift 2 ;;
    --shutdown) SHUTDOWN_MODE="${2:?--shutdown needs arm, dry-run or off}"; shift 2 ;;
    --plan) PLAN_ONLY=1; shift ;;
    *) log "unknown argument: $1"; echo 2 > exit_code; exit 2 ;;
  esac
done

# --- RunPod: the pod id is in PID 1's environment, which a non-interactive SSH session may not get --------
RUNPOD_ID="${RUNPOD_POD_ID:-}"
if [ -z "$RUNPOD_ID" ] && [ -r /etc/rp_environment ]; then
  RUNPOD_ID="$(sed -n 's/^\(export \)\{0,1\}RUNPOD_POD_ID=["'\'']\{0,1\}\([A-Za-z0-9_-]*\).*/\2/p' /etc/rp_environment | head -n1)"
fi
deadline_method() {
  if [ -z "$DEADLINE_S" ] || [ "${FTPLAN_NO_SHUTDOWN:-0}" = "1" ] || [ "$SHUTDOWN_MODE" = "off" ]; then echo none
  elif [ -n "$RUNPOD_ID" ]; then echo runpodctl
  else echo shutdown
  fi
}

# --- 4a. the image's interpreters, found as a login shell finds them (conda, /opt/pytorch, /usr) -------------
# FTPLAN_PYTHON_PATHS (colon-separated) replaces the well-known locations checked besides PATH.
find_pythons() {
  { bash -lc 'command -v python3; command -v python' 2>/dev/null
    command -v python3 python 2>/dev/null
    local IFS=:
    for p in ${FTPLAN_PYTHON_PATHS:-/opt/conda/bin/python:/opt/pytorch/bin/python3:/usr/local/bin/python3:/usr/bin/python3}; do
      [ -x "$p" ] && echo "$p"
    done; } | awk 'NF && !seen[$0]++'
}

# Probe each interpreter (torch import + CUDA init: bounded) and ask torch_select.py for the plan.
make_plan() {
  PY0=""
  local n=0 py probes=() tmp rc
  tmp="$(mktemp -d)"
  while IFS= read -r py; do
    n=$((n + 1))
    if timeout 180 "$py" "$TS" probe > "$tmp/probe-$n.json" 2>/dev/null; then
      probes+=("$tmp/probe-$n.json")
      [ -n "$PY0" ] || PY0="$py"
    fi
  done < <(find_pythons)
  [ -n "$PY0" ] || { rm -rf "$tmp"; return 1; }
  local uv_flag=()
  command -v uv >/dev/null 2>&1 && uv_flag=(--uv-on-path)
  "$PY0" "$TS" plan "${uv_flag[@]}" "--deadline=$(deadline_method)" "${probes[@]}"
  rc=$?
  rm -rf "$tmp"
  return $rc
}

json_get() { "$PY0" -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
if isinstance(v, list):
    print("\n".join(map(str, v)))
else:
    print("" if v is None else (str(v).lower() if isinstance(v, bool) else v))' "$1" "$2"; }

if [ "$PLAN_ONLY" = "1" ]; then
  make_plan || { echo '{"error": "no python3 found on this machine; install python3"}'; exit 3; }
  exit 0
fi

echo $$ > pid
rm -f exit_code
WATCHDOG_PID=""
TRAIN_PID=""
FETCH_PID=""
BOOT_T0=$(date +%s)
# exit_code is written atomically on every exit path, including a TERM from `kill`; a weight download still
# running (setup failed) is stopped.
trap 'rc=$?; [ -n "$WATCHDOG_PID" ] && kill -- "-$WATCHDOG_PID" 2>/dev/null; [ -n "$FETCH_PID" ] && kill "$FETCH_PID" 2>/dev/null; echo "$rc" > exit_code.tmp && mv -f exit_code.tmp exit_code' EXIT
# A TERM (launcher, watchdog) reaches the job, which checkpoints; we exit once it has.
on_signal() { [ -n "$TRAIN_PID" ] && kill -TERM "$TRAIN_PID" 2>/dev/null && wait "$TRAIN_PID"; exit "$1"; }
trap 'on_signal 143' TERM
trap 'on_signal 130' INT
log "run dir $RUN_DIR, pid $$"

# --- 2. on-instance deadline ---------------------------------------------------------------
arm_watchdog() {
  # The machine keeps billing, but the job stops: the launcher or `ftplan gc` must end the machine.
  command -v setsid >/dev/null 2>&1 || { log "no setsid: no watchdog either"; return 0; }
  setsid bash -c "sleep $DEADLINE_S; kill -TERM $$ 2>/dev/null; sleep 60; kill -KILL -- -$$ 2>/dev/null" \
    >/dev/null 2>&1 < /dev/null &
  WATCHDOG_PID=$!
  echo "watchdog: TERM the job after ${DEADLINE_S}s" > deadline.watchdog
  log "watchdog armed: the job stops after ${DEADLINE_S}s (the machine itself is not stopped)"
}

arm_deadline() {
  [ -n "$DEADLINE_S" ] || { log "no deadline requested"; return 0; }
  case "$DEADLINE_S" in *[!0-9]*) log "deadline '$DEADLINE_S' is not a number of seconds; not armed"; return 0 ;; esac
  local minutes=$(( (DEADLINE_S + 59) / 60 ))
  [ "$minutes" -ge 1 ] || minutes=1
  local method cmd
  method="$(deadline_method)"
  if [ "$method" = "runpodctl" ]; then
    cmd="runpodctl stop pod $RUNPOD_ID"
  else
    cmd="shutdown -h +$minutes"
    [ "$(id -u)" -eq 0 ] || cmd="sudo -n $cmd"
  fi
  if [ "$SHUTDOWN_MODE" = "dry-run" ]; then
    log "deadline dry-run: would run: $cmd"
    return 0
  fi
  if [ "$method" = "none" ]; then
    log "deadline not armed (shutdown disabled: --shutdown $SHUTDOWN_MODE, FTPLAN_NO_SHUTDOWN=${FTPLAN_NO_SHUTDOWN:-unset})"
    return 0
  fi
  if [ "$method" = "runpodctl" ]; then
    # A container has no init to shut down: RunPod's own CLI (its pod API key is in the pod's env) stops
    # the pod at the deadline, from a timer in its own session that outlives this script.
    if command -v runpodctl >/dev/null 2>&1 && command -v setsid >/dev/null 2>&1; then
      setsid bash -c "sleep $DEADLINE_S; $cmd" >/dev/null 2>&1 < /dev/null &
      echo "$cmd (in ${DEADLINE_S}s)" > deadline.armed
      log "deadline armed: $cmd after ${DEADLINE_S}s (RunPod container: no shutdown)"
      return 0
    fi
    log "could not arm the deadline (RunPod pod $RUNPOD_ID without runpodctl); continuing with a watchdog"
    arm_watchdog
    return 0
  fi
  if $cmd >/dev/null 2>&1; then
    echo "$cmd" > deadline.armed
    log "deadline armed: $cmd (${DEADLINE_S}s)"
  else
    log "could not arm the deadline ($cmd failed: no sudo or no shutdown here); continuing with a watchdog"
    arm_watchdog
  fi
}
arm_deadline

# --- 3. secrets ------------------------------------------------------------------------------
if [ -f secrets.env ]; then
  set -a
  # shellcheck disable=SC1091
  . ./secrets.env
  set +a
  log "loaded secrets.env ($(grep -c '=' secrets.env) variables)"
fi

# --- 4. Python -------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1

fail_setup() {  # a summary the launcher shows, then exit
  local code="$1"; shift
  log "$*"
  mkdir -p out
  if [ -n "${PY0:-}" ]; then
    "$PY0" -c 'import json, sys; json.dump({"status": "failed", "error": sys.argv[1], "steps": 0, "phase": "bootstrap"},
      open("out/summary.json", "w"))' "$*" 2>/dev/null
  fi
  exit "$code"
}

get_uv() {  # prints the uv binary, or nothing
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  [ -x "$RUN_DIR/.tools/bin/uv" ] && { echo "$RUN_DIR/.tools/bin/uv"; return; }
  [ -x "$RUN_DIR/.tools/uv" ] && { echo "$RUN_DIR/.tools/uv"; return; }
  if "$PY0" -m pip --version >/dev/null 2>&1 \
     && "$PY0" -m pip install -q --disable-pip-version-check --target "$RUN_DIR/.tools" uv >&2 \
     && [ -x "$RUN_DIR/.tools/bin/uv" ]; then
    echo "$RUN_DIR/.tools/bin/uv"; return
  fi
  "$PY0" "$TS" fetch-uv "$RUN_DIR/.tools" 2>/dev/null | tail -n1
}

# The Hub client alone first (small; its pins are requirements.txt's, so the full install keeps them), then
# the weights download in the background while the rest installs.
start_weight_fetch() {
  [ -f job/fetch_weights.py ] || return 0
  grep -i -E '^[[:space:]]*(huggingface[-_]hub|hf[-_]xet)[[:space:]]*[=<>~!;]' requirements.txt > .requirements-hub.txt
  [ -s .requirements-hub.txt ] || { log "weights: no huggingface_hub in requirements.txt; the job downloads them"; return 0; }
  if vinstall -r .requirements-hub.txt; then
    HF_HUB_DISABLE_PROGRESS_BARS=1 "$VENV/bin/python" job/fetch_weights.py --config job.json \
      --record .ftplan-download.json &
    FETCH_PID=$!
    log "weights: download started in the background (pid $FETCH_PID) before the rest of the environment"
  else
    log "weights: huggingface_hub did not install alone; the job downloads the model itself"
  fi
}

# Liger's Triton kernels (fused linear cross-entropy) on CUDA machines only, never with another torch.
LIGER="skipped"
install_cuda_extras() {
  [ -f requirements-cuda.txt ] || return 0
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }; then
    log "no GPU listed by nvidia-smi: requirements-cuda.txt not installed"
    return 0
  fi
  "$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > .torch-constraint.txt \
    2>/dev/null || : > .torch-constraint.txt
  if "$VENV/bin/python" -m pip --version >/dev/null 2>&1 && [ "$REUSE" = "true" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c .torch-constraint.txt -r requirements-cuda.txt
  else
    vinstall -c .torch-constraint.txt -r requirements-cuda.txt
  fi
  if [ $? -eq 0 ]; then LIGER="installed"; log "installed requirements-cuda.txt (Liger kernels)"
  else LIGER="failed"; log "warning: requirements-cuda.txt did not install; the job uses its chunked loss"
  fi
}

# Waits for the background download, then writes what the bootstrap measured (numbers and fixed words only;
# the download's own record is JSON written by fetch_weights.py) for the job's summary.json.
finish_weight_fetch() {
  local t_wait wait_s=0 download=null
  t_wait=$(date +%s)
  if [ -n "$FETCH_PID" ]; then
    wait "$FETCH_PID"
    FETCH_PID=""
    wait_s=$(( $(date +%s) - t_wait ))
    log "weights: download finished (waited ${wait_s}s after the environment)"
  fi
  [ -s .ftplan-download.json ] && download="$(cat .ftplan-download.json)"
  printf '{"started_at": %s, "env_s": %s, "wait_s": %s, "ready_s": %s, "reused_venv": %s, "liger": "%s", "download": %s}\n' \
    "$BOOT_T0" "${ENV_S:-0}" "$wait_s" "$(( $(date +%s) - BOOT_T0 ))" "$REUSED_VENV" "$LIGER" "$download" \
    > .ftplan-bootstrap.json
  export FTPLAN_BOOTSTRAP_TIMINGS="$RUN_DIR/.ftplan-bootstrap.json"
}

REUSED_VENV=false
if [ -n "$REMOTE_PYTHON" ]; then
  PY="$REMOTE_PYTHON"
  log "using the given Python: $PY"
else
  VENV="$RUN_DIR/.venv"
  if [ -f "$VENV/.ftplan-ready" ]; then
    log "reusing $VENV"
    REUSED_VENV=true
  else
    t0=$(date +%s)
    make_plan > bootstrap-plan.json || fail_setup 3 "no python3 found on this machine; install python3"
    log "plan: $(tr -d '\n' < bootstrap-plan.json | tr -s ' ')"
    err="$(json_get bootstrap-plan.json error)"
    [ -z "$err" ] || fail_setup 5 "cannot pick a torch for this machine: $err"
    REUSE="$(json_get bootstrap-plan.json reuse_image_torch)"
    VENV_PY="$(json_get bootstrap-plan.json venv.python)"
    TORCH_SPEC="$(json_get bootstrap-plan.json torch.spec)"
    TORCH_INDEX="$(json_get bootstrap-plan.json torch.index_url)"
    log "torch: $(json_get bootstrap-plan.json reason)"
    UV="$(get_uv)"
    SEED=()
    [ "$REUSE" = "true" ] && SEED=(--seed)  # pip in the venv: it sees the image's torch through a .pth, uv would not
    rm -rf "$VENV"
    if [ -n "$UV" ] && "$UV" venv -q "${SEED[@]}" --python "$VENV_PY" "$VENV"; then
      log "venv by uv ($UV) on $VENV_PY"
      vinstall() { "$UV" pip install -q --python "$VENV/bin/python" "$@"; }
    else
      log "uv unavailable; python -m venv + pip"
      "$VENV_PY" -m venv "$VENV" \
        || fail_setup 3 "cannot create a venv: no uv (PyPI unreachable?) and no python3-venv (apt-get install python3-venv)"
      vinstall() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
    fi
    REQS=requirements.txt
    if [ "$REUSE" = "true" ]; then
      # The image's torch stays: its site-packages go on the venv's path after the venv's own (a .pth file;
      # works when the image's Python is itself a venv, e.g. /opt/pytorch), and pip keeps torch pinned.
      SITE_DIR="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
      json_get bootstrap-plan.json venv.image_site_paths > "$SITE_DIR/_ftplan_image_site.pth"
      grep -v -E '^[[:space:]]*torch([[:space:]]*[<>=!~;[]|[[:space:]]*$)' requirements.txt > .requirements-no-torch.txt
      "$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > .torch-constraint.txt \
        || fail_setup 4 "the image's torch does not import from the venv"
      REQS=.requirements-no-torch.txt
      start_weight_fetch
      log "installing the rest of the environment"
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c .torch-constraint.txt -r "$REQS" \
        || fail_setup 4 "pip install -r $REQS failed"
    else
      start_weight_fetch
      log "installing the rest of the environment"
      if [ -n "$TORCH_SPEC" ]; then
        log "installing $TORCH_SPEC from $TORCH_INDEX"
        vinstall --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC" || fail_setup 4 "installing $TORCH_SPEC failed"
      fi
      vinstall -r "$REQS" || fail_setup 4 "installing -r $REQS failed"
    fi
    install_cuda_extras
    ENV_S=$(( $(date +%s) - t0 ))
    log "environment ready in ${ENV_S}s: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "sees GPU:", torch.cuda.is_available())' 2>&1 | tail -n1)"
    touch "$VENV/.ftplan-ready"
  fi
  PY="$VENV/bin/python"
fi

# --- 4b. the machine's watchdog (job/watchdog.py; settings FTPLAN_WATCHDOG_* from secrets.env): its own session,
# so it outlives this script and the SSH session: budget stop, spot notices, upload + power-off after the grace.
if [ -n "${FTPLAN_WATCHDOG_PRICE_HOUR:-}" ] && [ -f job/watchdog.py ]; then
  case "${FTPLAN_WATCHDOG_BUCKET:-}" in s3://*) "$PY" -c 'import boto3' 2>/dev/null || "$PY" -m pip install -q boto3 >/dev/null 2>&1 || log "no boto3: the watchdog cannot upload to s3";; esac
  RUNPOD_POD_ID="${RUNPOD_POD_ID:-$RUNPOD_ID}" setsid nohup "$PY" job/watchdog.py --run-dir "$RUN_DIR" >> watchdog.log 2>&1 < /dev/null &
  log "watchdog started (pid $!)"
fi

# --- 5. train --------------------------------------------------------------------------------
finish_weight_fetch
log "starting: $PY job/train.py --config job.json"
"$PY" job/train.py --config job.json &
TRAIN_PID=$!
wait "$TRAIN_PID"
rc=$?
log "training exited with status $rc"
exit "$rc"
