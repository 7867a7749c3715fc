#!/usr/bin/env bash
# GPU calibration on a machine that has only the repo checkout (no ftplan install).
#   bash benchmarks/gpu_calibration.sh --out "$OUT" [gpu_calibration.py options]
# Uses $PYTHON (default python3) when it imports the job's libraries and the planner's pydantic; otherwise
# makes a venv that sees the system packages (a GPU image's CUDA torch is reused, never downloaded again)
# and pip-installs remote_job/requirements.txt into it. Without internet pip can only use local wheels:
# set WHEELS=/path/to/wheels (pip --no-index --find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
NEEDS='import torch, transformers, peft, bitsandbytes, accelerate, tokenizers, safetensors, pydantic'
if ! "$PY" -c "$NEEDS" 2>/dev/null; then
  VENV="${CALIBRATION_VENV:-/tmp/ftplan-calibration-venv}"
  echo "gpu_calibration.sh: $PY cannot import the job's libraries; installing into $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q -r remote_job/requirements.txt pydantic)
  if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
  "${PIP[@]}"
  PY="$VENV/bin/python"
  "$PY" -c "$NEEDS"
fi
"$PY" -c 'import importlib.util, torch; print("torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "| liger-kernel",
          "yes (job loss: liger)" if importlib.util.find_spec("liger_kernel") else "no (job loss: chunked)", flush=True)'
exec "$PY" benchmarks/gpu_calibration.py "$@"
