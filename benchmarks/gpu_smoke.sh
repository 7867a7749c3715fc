#!/usr/bin/env bash
# One-shot GPU smoke test of the job, for the first machine with a GPU (about 8 minutes on one H100):
#   bash benchmarks/gpu_smoke.sh [--out DIR] [--cpu-only] [--skip-bootstrap] [--layers N]
# 1. bootstrap.sh end to end in a scratch run dir, as the launcher ships it (torch matched to the driver,
#    uv or pip): time, venv size, and the tiny QLoRA job it starts must run on `cuda`;
# 2. benchmarks/gpu_smoke.py with that venv's Python: CUDA checks, NF4 + double-quant fwd/bwd (bf16, fp16)
#    against a dequantized reference, one paged 8-bit AdamW step, the precision chosen, the tiny job with
#    eval, checkpoints, STOP and resume, and a random-init 1.9B Llama's allocated/reserved/device peaks and
#    tokens/s against the estimate's parts. One JSON ($OUT/gpu_smoke.json) and `key: value` headlines.
# --cpu-only: what needs no GPU (CI runs it); --skip-bootstrap: use $PYTHON (default python3) as is.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT:-gpu-smoke-out}"
CPU_ONLY=0
SKIP_BOOT=0
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --cpu-only) CPU_ONLY=1; PASS+=(--cpu-only); shift ;;
    --skip-bootstrap) SKIP_BOOT=1; shift ;;
    --layers) PASS+=(--layers "$2"); shift 2 ;;
    *) echo "gpu_smoke.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR/work"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"

if [ "$CPU_ONLY" = "0" ] && [ "$SKIP_BOOT" = "0" ]; then
  RUN="$OUT_DIR/work/boot"
  rm -rf "$RUN" && mkdir -p "$RUN/job"
  cp remote_job/*.py "$RUN/job/" && cp remote_job/bootstrap.sh remote_job/requirements.txt "$RUN/"
  python3 -c 'import sys; sys.path.insert(0, "tests"); from pathlib import Path; from job_helpers import make_job
make_job(Path(sys.argv[1]), "qlora", optimizer="paged_adamw_8bit", max_steps=4, checkpoint_every_steps=2)' "$RUN"
  t0=$(date +%s)
  bash "$RUN/bootstrap.sh" --shutdown off > "$OUT_DIR/bootstrap.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  mib=$(du -sm "$RUN/.venv" 2>/dev/null | cut -f1)
  python3 - "$RUN" "$rc" "$secs" "${mib:-0}" "$OUT_DIR/bootstrap.json" <<'PYEOF'
import json, sys
run, rc, secs, mib, dest = sys.argv[1:]
try:
    s = json.load(open(f"{run}/out/summary.json"))
except (OSError, ValueError):
    s = {}
try:
    plan = json.load(open(f"{run}/bootstrap-plan.json"))
except (OSError, ValueError):
    plan = {}
json.dump({"exit": int(rc), "seconds_total": int(secs), "venv_mib": int(mib), "job_device": s.get("device"),
           "job_status": s.get("status"), "job_error": s.get("error"), "torch": s.get("torch_version"),
           "torch_cuda": s.get("torch_cuda"), "plan_torch": (plan.get("torch") or {}).get("spec"),
           "reused_image_torch": plan.get("reuse_image_torch")}, open(dest, "w"), indent=1)
PYEOF
  PASS+=(--bootstrap-json "$OUT_DIR/bootstrap.json")
  echo "bootstrap_exit: $rc"
  echo "bootstrap_seconds: $secs"
  if [ -x "$RUN/.venv/bin/python" ]; then
    PY="$RUN/.venv/bin/python"
    # the estimate comparison needs the planner's one dependency
    if ! "$PY" -c 'import pydantic' 2>/dev/null; then
      UV="$(command -v uv || ls "$RUN"/.tools/bin/uv "$RUN"/.tools/uv 2>/dev/null | head -n1)"
      if [ -n "$UV" ]; then "$UV" pip install -q --python "$PY" pydantic; else "$PY" -m pip install -q pydantic; fi
    fi
  fi
fi
exec "$PY" benchmarks/gpu_smoke.py --out "$OUT_DIR" "${PASS[@]}"
