"""One-shot GPU smoke test of the job on a rented machine (driven by benchmarks/gpu_smoke.sh).

Each check records what it saw in one JSON (`$OUT/gpu_smoke.json`) and the run ends with `key: value`
headline lines. `--cpu-only` runs the checks that need no GPU (machine facts, bootstrap --plan, device
and precision choice, the tiny job on the CPU with eval, STOP and resume): CI runs it so it cannot rot.
Checks that fail are recorded (`"ok": false` with the error) and the script goes on to the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB_DIR = ROOT / "remote_job"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the planner from the checkout (estimate parts), installed or not
sys.path.insert(0, str(JOB_DIR))
sys.path.insert(0, str(ROOT / "tests"))  # job_helpers: the tiny offline job the tests use

GIB = 1024**3
RESULTS: dict = {"checks": {}}


def check(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            try:
                out = fn(*args, **kwargs) or {}
                out.setdefault("ok", True)
            except Exception as exc:  # noqa: BLE001 - a smoke run reports every failure and goes on
                out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                       "trace": traceback.format_exc()[-1500:]}
            out["seconds"] = round(time.time() - t0, 2)
            RESULTS["checks"][name] = out
            return out
        return run
    return wrap


def sh(cmd: list[str], timeout: float = 60, **kw) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


@check("machine")
def machine() -> dict:
    import torch_select

    return {"gpus": torch_select.query_gpus(), "python": sys.version.split()[0],
            "python3_venv": sh(["python3", "-c", "import ensurepip; print('yes')"]) == "yes",
            "disk": sh(["df", "-h", str(ROOT)]).splitlines()[-1:], "memory": sh(["free", "-g"]).splitlines()[1:2],
            "nvidia_smi_L": sh(["nvidia-smi", "-L"]).splitlines()}


@check("bootstrap_plan")
def bootstrap_plan(work: Path) -> dict:
    run = work / "plan"
    (run / "job").mkdir(parents=True)
    shutil.copy(JOB_DIR / "bootstrap.sh", run / "bootstrap.sh")
    shutil.copy(JOB_DIR / "torch_select.py", run / "job" / "torch_select.py")
    shutil.copy(JOB_DIR / "requirements.txt", run / "requirements.txt")
    out = subprocess.run(["bash", str(run / "bootstrap.sh"), "--plan"], capture_output=True, text=True, timeout=300)
    plan = json.loads(out.stdout)
    return {"ok": out.returncode == 0 and not plan.get("error"), "plan": plan}


@check("bootstrap_install")
def bootstrap_install(path: Path) -> dict:
    """What gpu_smoke.sh measured running bootstrap.sh end to end (no --remote-python) before this script."""
    res = json.loads(path.read_text())
    res["ok"] = res.get("exit") == 0 and res.get("job_device") == "cuda"
    return res


@check("cuda")
def cuda_checks() -> dict:
    import device_check
    import torch

    info = device_check.facts(torch)
    device = device_check.pick_device(None, torch, info)
    out = {"device": device, **info}
    if device == "cuda":
        dtype = device_check.pick_dtype("auto", "cuda", torch)
        out.update(arch_list=torch.cuda.get_arch_list(), **device_check.check_bitsandbytes_cuda(torch, dtype))
    return out


@check("nf4_matmul")
def nf4_matmul() -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        w = torch.randn(1024, 512, device="cuda", dtype=dtype)
        packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        deq = F.dequantize_4bit(packed, state)
        x = torch.randn(16, 512, device="cuda", dtype=dtype, requires_grad=True)
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        y.float().sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        ref = x_ref @ deq.t()
        ref.float().sum().backward()
        out[name] = {"fwd_max_rel_err": float((y - ref).abs().max() / ref.abs().max()),
                     "bwd_max_rel_err": float((x.grad - x_ref.grad).abs().max() / x_ref.grad.abs().max()),
                     "quant_max_rel_err": float((deq - w).abs().max() / w.abs().max())}
    out["ok"] = all(v["fwd_max_rel_err"] < 0.02 and v["bwd_max_rel_err"] < 0.02 for v in out.values())
    return out


@check("paged_adamw8bit")
def paged_adamw() -> dict:
    import bitsandbytes as bnb
    import job_progress
    import torch

    p = torch.nn.Parameter(torch.randn(512, 512, device="cuda"))
    before = p.detach().clone()
    opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    paged = job_progress.paged_optimizer_bytes(opt)
    return {"ok": paged > 0 and not torch.equal(before, p.detach()), "paged_state_bytes": paged,
            "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1)}


@check("precision")
def precision(device: str) -> dict:
    import device_check
    import torch

    dtype = device_check.pick_dtype("auto", device, torch)
    cap = torch.cuda.get_device_capability() if device == "cuda" else None
    return {"chosen": str(dtype).replace("torch.", ""), "capability": cap}


def _run_job(cfg: Path, python: str, env: dict | None = None, timeout: float = 900):
    from job_helpers import job_env

    return subprocess.run([python, str(JOB_DIR / "train.py"), "--config", str(cfg)], capture_output=True,
                          text=True, timeout=timeout, env=job_env(env))


@check("tiny_job_stop_resume")
def tiny_job(work: Path, device: str, python: str) -> dict:
    """The tiny QLoRA job: eval and checkpoints every 2 steps, a STOP after step 2, then resume to the end."""
    from job_helpers import make_job, read_json

    d = work / "tiny"
    cfg = make_job(d, method="qlora", optimizer="paged_adamw_8bit", max_steps=6, checkpoint_every_steps=2,
                   throttle_s_per_step=0.5)
    proc = subprocess.Popen([python, str(JOB_DIR / "train.py"), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    hb = d / "out" / "heartbeat.json"
    for _ in range(1200):
        try:
            if json.loads(hb.read_text()).get("step", 0) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    (d / "STOP").write_text("smoke\n")
    proc.wait(timeout=600)
    first = read_json(d / "out" / "summary.json")
    second_proc = _run_job(cfg, python)
    second = read_json(d / "out" / "summary.json")
    ok = (first.get("status") == "stopped" and second.get("status") == "succeeded"
          and second.get("resumed_from_step") == first.get("steps") and second.get("device") == device
          and second.get("eval_loss") is not None and second["model"]["linear4bit_modules"] == 14)
    return {"ok": ok, "stopped_at": first.get("steps"), "resumed_from_step": second.get("resumed_from_step"),
            "status": second.get("status"), "device": second.get("device"), "eval_loss": second.get("eval_loss"),
            "precision": second.get("precision"), "exit": second_proc.returncode,
            "error": second.get("error") or first.get("error")}


def _steady_tokens_per_s(out_dir: Path) -> float | None:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    rows = [r for r in rows if "tokens_seen" in r]
    if len(rows) < 3:
        return None
    a, b = rows[1], rows[-1]  # from the end of step 2: the warm-up step is excluded
    # elapsed_s includes eval/checkpoints between them; the smoke job below has none in that window
    return round((b["tokens_seen"] - a["tokens_seen"]) / (b["elapsed_s"] - a["elapsed_s"]), 1)


@check("mid_model_memory")
def mid_model(work: Path, python: str, layers: int) -> dict:
    """A random-init Llama-shaped model (about 1-8B): measured peaks against the estimate's parts."""
    from job_helpers import make_job, read_json

    from ftplan.planner.estimate.estimator import EstimateRequest, estimate
    from ftplan.planner.estimate.gpus import resolve_gpu
    from ftplan.planner.estimate.models import from_hf_config

    hf = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": layers,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
          "tie_word_embeddings": False}
    d = work / "mid"
    cfg = make_job(d, method="qlora", optimizer="paged_adamw_8bit", model={"config": hf}, seq_len=1024,
                   batch_size=2, max_steps=12, checkpoint_every_steps=1000, eval_fraction=0.0, n=200,
                   lora={"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}, loss="standard")
    proc = _run_job(cfg, python, timeout=900)
    s = read_json(d / "out" / "summary.json")
    spec = from_hf_config(hf, name="smoke-llama")
    import torch

    name = torch.cuda.get_device_name(0)
    gpu = None
    for cand in (name, *name.replace("NVIDIA ", "").split()):
        try:
            gpu = resolve_gpu(cand)
            break
        except Exception:  # noqa: BLE001 - try the next spelling
            continue
    req = EstimateRequest(model=spec, method="qlora", seq_len=1024, batch_size=2, lora_r=16, lora_alpha=32,
                          optimizer="paged_adamw_8bit", loss="standard")
    est = estimate(req, gpu or resolve_gpu("H100"), 1)
    fig = est.memory.figures()
    steady = _steady_tokens_per_s(d / "out")
    return {"ok": proc.returncode == 0, "params": spec.params_total(), "summary_device": s.get("device"),
            "allocated_gib": s.get("peak_mem_allocated_gib"), "reserved_gib": s.get("peak_mem_reserved_gib"),
            "device_gib": s.get("peak_mem_device_gib"), "paged_optimizer_gib": s.get("paged_optimizer_gib"),
            "estimate": fig, "estimate_parts": est.memory.as_dict(),
            "allocated_vs_estimate": round(s["peak_mem_allocated_gib"] / fig["allocated"], 3)
            if s.get("peak_mem_allocated_gib") else None,
            "tokens_per_s_summary": s.get("tokens_per_s"), "tokens_per_s_wall": s.get("tokens_per_s_wall"),
            "tokens_per_s_steady": steady, "estimate_tokens_per_s": round(est.tokens_per_s, 1),
            "durations_s": s.get("durations_s"), "error": s.get("error")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-smoke-out"))
    ap.add_argument("--cpu-only", action="store_true", help="only the checks that need no GPU (CI)")
    ap.add_argument("--bootstrap-json", help="bootstrap.sh's end-to-end result, written by gpu_smoke.sh")
    ap.add_argument("--layers", type=int, default=8, help="mid-size model depth (8 ~ 1.9B params at 4096 wide)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    t0 = time.time()
    machine()
    bootstrap_plan(work)
    python = sys.executable  # gpu_smoke.sh runs this script with the venv bootstrap.sh built
    if args.bootstrap_json:
        bootstrap_install(Path(args.bootstrap_json))
    if args.cpu_only:
        device = "cpu"
        cuda = cuda_checks()
        cuda["ok"] = cuda.get("device") == "cpu"  # no GPU listed: the job trains on the CPU as before
    else:
        device = "cuda"
        cuda_checks()
        nf4_matmul()
        paged_adamw()
    precision(device)
    tiny_job(work, device, python)
    if not args.cpu_only:
        mid_model(work, python, args.layers)
    RESULTS["seconds"] = round(time.time() - t0, 1)
    RESULTS["mode"] = "cpu-only" if args.cpu_only else "gpu"
    (out / "gpu_smoke.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    c = RESULTS["checks"]
    print(f"mode: {RESULTS['mode']}")
    for name, res in c.items():
        print(f"{name}: {'ok' if res.get('ok') else 'FAILED ' + str(res.get('error', ''))[:200]}")
    gpus = c["machine"].get("gpus") or []
    print(f"gpu: {gpus[0]['name'] + ' driver ' + gpus[0]['driver'] if gpus else 'none'}")
    plan = c["bootstrap_plan"].get("plan") or {}
    print(f"bootstrap_torch: {(plan.get('torch') or {}).get('spec') or ('image' if plan.get('reuse_image_torch') else None)}")
    if "bootstrap_install" in c:
        print(f"bootstrap_seconds: {c['bootstrap_install'].get('seconds_total')}")
        print(f"venv_mib: {c['bootstrap_install'].get('venv_mib')}")
    print(f"precision: {c['precision'].get('chosen')}")
    print(f"tiny_job: {c['tiny_job_stop_resume'].get('status')} on {c['tiny_job_stop_resume'].get('device')}, "
          f"resumed from {c['tiny_job_stop_resume'].get('resumed_from_step')}")
    if "mid_model_memory" in c:
        m = c["mid_model_memory"]
        for key in ("params", "allocated_gib", "reserved_gib", "device_gib", "paged_optimizer_gib",
                    "allocated_vs_estimate", "tokens_per_s_summary", "tokens_per_s_steady", "estimate_tokens_per_s"):
            print(f"mid_{key}: {m.get(key)}")
        print(f"mid_estimate: {m.get('estimate')}")
    print(f"seconds: {RESULTS['seconds']}")
    print(f"json: {out / 'gpu_smoke.json'}")
    return 0 if all(r.get("ok") for r in c.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
