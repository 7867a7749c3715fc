#!/usr/bin/env bash
# ftplan bootstrap: runs inside the unpacked run dir on the GPU machine.
#
#   bash bootstrap.sh [--remote-python PATH] [--deadline-s N] [--shutdown arm|dry-run|off]
#
# The SSH runner starts it detached (setsid nohup ... >> train.log 2>&1 < /dev/null &) so a dropped
# connection does not kill training. It
#   1. writes its PID (= process group id) to ./pid and, whatever happens, ./exit_code at the end;
#   2. arms `shutdown -h +MIN` at the run's deadline so the machine ends itself even if the launcher
#      dies (--shutdown off or FTPLAN_NO_SHUTDOWN=1: never; dry-run: only log the command);
#   3. loads ./secrets.env (0600) into the environment; secrets never appear on a command line;
#   4. picks Python: --remote-python, else a venv (reusing the image's CUDA torch via
#      --system-site-packages when there is one) with requirements.txt installed;
#   5. runs `job/train.py --config job.json` and exits with its status.
set -uo pipefail

RUN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$RUN_DIR" || exit 97

log() { printf '[ftplan-bootstrap %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

REMOTE_PYTHON=""
DEADLINE_S=""
SHUTDOWN_MODE="arm"
while [ $# -gt 0 ]; do
  case "$1" in
    --remote-python) REMOTE_PYTHON="${2:?--remote-python needs a path}"; shift 2 ;;
    --deadline-s) DEADLINE_S="${2:?--deadline-s needs seconds}"; shift 2 ;;
    --shutdown) SHUTDOWN_MODE="${2:?--shutdown needs arm, dry-run or off}"; shift 2 ;;
    *) log "unknown argument: $1"; echo 2 > exit_code; exit 2 ;;
  esac
done

echo $$ > pid
rm -f exit_code
# exit_code is written atomically on every exit path, including a TERM from `kill`.
trap 'rc=$?; echo "$rc" > exit_code.tmp && mv -f exit_code.tmp exit_code' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
log "run dir $RUN_DIR, pid $$"

# --- 2. on-instance deadline ---------------------------------------------------------------
arm_deadline() {
  [ -n "$DEADLINE_S" ] || { log "no deadline requested"; return 0; }
  case "$DEADLINE_S" in *[!0-9]*) log "deadline '$DEADLINE_S' is not a number of seconds; not armed"; return 0 ;; esac
  local minutes=$(( (DEADLINE_S + 59) / 60 ))
  [ "$minutes" -ge 1 ] || minutes=1
  local cmd="shutdown -h +$minutes"
  [ "$(id -u)" -eq 0 ] || cmd="sudo -n $cmd"
  if [ "$SHUTDOWN_MODE" = "dry-run" ]; then
    log "deadline dry-run: would run: $cmd"
    return 0
  fi
  if [ "${FTPLAN_NO_SHUTDOWN:-0}" = "1" ] || [ "$SHUTDOWN_MODE" != "arm" ]; then
    log "deadline not armed (shutdown disabled: --shutdown $SHUTDOWN_MODE, FTPLAN_NO_SHUTDOWN=${FTPLAN_NO_SHUTDOWN:-unset})"
    return 0
  fi
  if $cmd >/dev/null 2>&1; then
    echo "$cmd" > deadline.armed
    log "deadline armed: $cmd (${DEADLINE_S}s)"
  else
    log "could not arm the deadline ($cmd failed: no sudo or no shutdown here); continuing without it"
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
if [ -n "$REMOTE_PYTHON" ]; then
  PY="$REMOTE_PYTHON"
  log "using the given Python: $PY"
else
  VENV="$RUN_DIR/.venv"
  if [ -f "$VENV/.ftplan-ready" ]; then
    log "reusing $VENV"
  else
    REQS=requirements.txt
    if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
      log "the image's torch sees CUDA: venv with --system-site-packages, torch kept"
      python3 -m venv --system-site-packages "$VENV" || { log "python3 -m venv failed (install python3-venv)"; exit 3; }
      grep -v -E '^[[:space:]]*torch([[:space:]]*[<>=!~;[]|[[:space:]]*$)' requirements.txt > .requirements-no-torch.txt
      REQS=.requirements-no-torch.txt
    else
      log "no CUDA-ready torch in the image: fresh venv"
      python3 -m venv "$VENV" || { log "python3 -m venv failed (install python3-venv)"; exit 3; }
    fi
    "$VENV/bin/python" -m pip install -r "$REQS" || { log "pip install -r $REQS failed"; exit 4; }
    touch "$VENV/.ftplan-ready"
  fi
  PY="$VENV/bin/python"
fi

# --- 5. train --------------------------------------------------------------------------------
log "starting: $PY job/train.py --config job.json"
"$PY" job/train.py --config job.json
rc=$?
log "training exited with status $rc"
exit "$rc"
