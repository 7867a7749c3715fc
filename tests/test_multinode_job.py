"""The job over several nodes: torchrun's c10d rendezvous joins two launchers; rank 0 on node 0 writes.

Two "nodes" on this machine: two copies of the same bundle (job.json + data) in two folders, two
`train.py` launchers with node_rank 0 and 1, the rendezvous on 127.0.0.1, gloo on the CPU, DDP.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from job_helpers import (
    TINY_LLAMA,
    TRAIN_SCRIPT,
    job_config,
    job_env,
    make_job,
    read_json,
    tiny_tokenizer,
    use_job_modules,
)

use_job_modules()
import job_config as jc  # noqa: E402
import job_distributed  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_base(folder) -> str:
    """A tiny Llama and its tokenizer in a local folder: what every node downloads from the hub."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    conf = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(LlamaConfig(**{**conf, "vocab_size": len(tok)})).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def start_nodes(tmp_path, nnodes: int = 2, **overrides) -> list[tuple]:
    """One launcher per node, each in its own folder (as on separate machines), listed by node rank."""
    endpoint = f"127.0.0.1:{free_port()}"
    base = tiny_base(tmp_path / "hub" / "tiny-llama")
    nodes = []
    # The last node starts first: c10d alone would then make it rank 0 (lowest pid on the same host).
    for rank in reversed(range(nnodes)):
        workdir = tmp_path / f"node{rank}"
        cfg = make_job(workdir, method="lora", nnodes=nnodes, node_rank=rank, rdzv_endpoint=endpoint,
                       rdzv_id="mn-test", model={"hf_id": base, "config": None, "random_init": False},
                       **overrides)
        proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(cfg)], cwd=str(workdir),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=job_env({"GLOO_SOCKET_IFNAME": "lo"}))
        nodes.insert(0, (workdir, proc))
    return nodes


def finish(nodes, timeout: float = 300) -> list[str]:
    outs = []
    try:
        for _, proc in nodes:
            outs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for _, proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


@pytest.mark.slow
def test_two_nodes_train_one_ddp_job_and_only_node_0_writes_the_adapter(tmp_path):
    nodes = start_nodes(tmp_path, max_steps=6, checkpoint_every_steps=3, batch_size=2)
    outs = finish(nodes)
    for k, ((_, proc), out) in enumerate(zip(nodes, outs, strict=True)):
        assert proc.returncode == 0, f"node {k}: " + "\n".join(line for line in out.splitlines()
                                                              if "Error" in line or "error" in line)[-3000:]
    node0, node1 = (w / "out" for w, _ in nodes)
    summary = read_json(node0 / "summary.json")
    assert summary["status"] == "succeeded" and summary["num_processes"] == 2
    assert summary["config"]["nnodes"] == 2 and summary["steps"] == 6
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < losses[0]
    adapters = sorted(tmp_path.glob("node*/out/adapter/adapter_model.safetensors"))
    assert adapters == [node0 / "adapter" / "adapter_model.safetensors"]
    assert not (node1 / "summary.json").exists()
    # both ranks' RNG states are in node 0's checkpoint only where the folder is shared; here node 0 has its own
    assert (node0 / "checkpoints" / "checkpoint-6" / "trainable.safetensors").exists()
    assert not list(node1.glob("checkpoints/checkpoint-*"))


def _cfg(**overrides):
    return jc.validate(job_config(**overrides))


def test_multinode_launch_command_uses_c10d_rendezvous_instead_of_standalone():
    cfg = _cfg(num_gpus=8, nnodes=3, node_rank=2, rdzv_endpoint="10.0.0.5:29400", run_id="r-42")
    cmd = job_distributed.launch_command(cfg, "/run/job.json", "/run/job/train.py")
    assert "--standalone" not in cmd
    flags = dict(zip(cmd[3:13:2], cmd[4:14:2], strict=True))
    assert flags == {"--nnodes": "3", "--node-rank": "2", "--rdzv-backend": "c10d",
                     "--rdzv-endpoint": "10.0.0.5:29400", "--rdzv-id": "r-42"}
    assert "--nproc_per_node=8" in cmd and cmd[-3:] == ["/run/job/train.py", "--config", "/run/job.json"]
    assert job_distributed.needs_launcher(_cfg(nnodes=2, rdzv_endpoint="h:1"))  # one GPU per node still launches
    single = job_distributed.launch_command(_cfg(num_gpus=2), "/j.json", "/t.py")
    assert "--standalone" in single and "--nnodes" not in single


def test_global_rank_follows_node_rank_not_the_rendezvous_order(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")                      # c10d put this node first
    job_distributed.pin_global_rank(_cfg(num_gpus=4, nnodes=2, node_rank=1, rdzv_endpoint="h:29400"))
    import os

    assert os.environ["RANK"] == "5"


@pytest.mark.parametrize("overrides, needle", [
    ({"nnodes": 2}, "rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "no-port"}, "host:port"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "node_rank"),
    ({"nnodes": 0}, "nnodes"),
    ({"rdzv_endpoint": "h:1"}, "nnodes"),
    ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_id": ""}, "rdzv_id"),
])
def test_bad_node_settings_are_refused_by_name(overrides, needle):
    with pytest.raises(jc.JobConfigError, match=needle):
        _cfg(**overrides)
