"""Several nodes: memory sharded over every GPU, collectives charged at the slower of NVLink and the nodes' network.

A step of N nodes x g GPUs is the single-machine estimate over N x g GPUs (ZeRO/FSDP shard over all of
them), with each GPU's collective bandwidth the smaller of its NVLink share (gpus.json, half of the
bidirectional figure each way) and its rail of the node's network (`catalogs/networks.json`: the NIC total
in Gb/s / 8 / g, the way NCCL's rings use one NIC per GPU). Whichever is smaller bounds the step, and the
estimate says which. No constant is fitted here: the bytes per collective are `throughput.communication_seconds`'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

from ftplan.planner.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.estimator import Estimate
    from ftplan.planner.estimate.gpus import GPU
    from ftplan.planner.estimate.request import EstimateRequest

DEFAULT_SSH_GBPS = 10.0  # an office or lab Ethernet link between machines you already have


@dataclass(frozen=True)
class NodeNetwork:
    provider: str
    instance_type: str
    gbps: float           # the node's NIC total, Gb/s (the provider's published maximum)
    fabric: str           # "EFA v2", "GPUDirect-TCPXO", "Ethernet (ENA)", ...
    placement: str        # the primitive that keeps the nodes close
    source: str

    def describe(self) -> str:
        return f"{self.fabric} {self.gbps:g} Gb/s"


@dataclass(frozen=True)
class MultiNodeEstimate:
    estimate: Estimate      # over nodes x gpus_per_node GPUs; memory is per GPU
    nodes: int
    gpus_per_node: int
    network: NodeNetwork
    bounding_link: str      # "NVLink ..." or the network's description: what limits the collectives

    def as_dict(self) -> dict:
        return {**self.estimate.as_dict(), "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "network": self.network.describe(), "bounding_link": self.bounding_link}


@lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    from ftplan.catalogs import data_path

    raw = json.loads(data_path("networks.json").read_text())
    table: dict[str, dict] = {}
    for provider, entry in raw["providers"].items():
        for itype, spec in entry["types"].items():
            gbps = spec.get("gbps")
            if not isinstance(gbps, (int, float)) or gbps <= 0 or not spec.get("fabric"):
                raise ValueError(f"networks.json: {provider}/{itype} needs a positive 'gbps' and a 'fabric'")
            table[f"{provider}/{itype}"] = {**spec, "placement": entry["placement"], "source": entry["source"]}
    return table


def node_network(provider: str, instance_type: str, ssh_gbps: float | None = None) -> NodeNetwork | None:
    """The inter-node network of `instance_type`, or None when the provider does not offer it as several nodes."""
    if provider == "ssh":
        return NodeNetwork("ssh", instance_type, ssh_gbps or DEFAULT_SSH_GBPS, "Ethernet", "your own machines",
                           "stated with --node-gbps" if ssh_gbps else "assumed; --node-gbps states yours")
    spec = _table().get(f"{provider}/{instance_type}")
    if spec is None:
        return None
    return NodeNetwork(provider, instance_type, float(spec["gbps"]), spec["fabric"], spec["placement"], spec["source"])


def multinode_types() -> list[tuple[str, str]]:
    """(provider, instance type) pairs that can be rented as several nodes."""
    return [tuple(key.split("/", 1)) for key in _table()]  # type: ignore[misc]


def node_link(gpu: GPU, gpus_per_node: int, nodes: int, network: NodeNetwork) -> tuple[GPU, str]:
    """The GPU as the collectives of `nodes` x `gpus_per_node` see it (its interconnect the slower of NVLink and
    its rail of the network) and a description of that bounding link. One node: the GPU unchanged."""
    if nodes == 1:
        return gpu, f"{gpu.interconnect} (one node)"
    nvlink_each_way = gpu.interconnect_gbs / 2                        # GB/s
    rail_each_way = network.gbps / 8 / gpus_per_node                  # GB/s per GPU
    if rail_each_way < nvlink_each_way:
        bound = f"{network.describe()} between nodes ({rail_each_way:.1f} GB/s per GPU)"
        return replace(gpu, interconnect_gbs=2 * rail_each_way), bound
    return gpu, f"{gpu.interconnect} inside each node"


def estimate_nodes(req: EstimateRequest, gpu: GPU, gpus_per_node: int, nodes: int,
                   network: NodeNetwork) -> MultiNodeEstimate:
    """The estimate of one job over `nodes` machines of `gpus_per_node` GPUs each."""
    from ftplan.planner.estimate.estimator import estimate

    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes and --gpus must be positive, got {nodes} node(s) x {gpus_per_node} GPU(s)")
    linked, bound = node_link(gpu, gpus_per_node, nodes, network)
    est = estimate(req, linked, nodes * gpus_per_node)
    return MultiNodeEstimate(replace(est, gpu=gpu) if linked is not gpu else est, nodes, gpus_per_node, network,
                             bound)
