"""`ftplan estimate --nodes N`: one job over N machines of --gpus GPUs each.

Memory per GPU shards over N x gpus (ZeRO-3/FSDP); the collectives run at the slower of NVLink and the
network between the nodes, and the output names that link. Without a provider there is no catalog entry
for the network: --node-gbps states it, else the 10 Gb/s Ethernet of machines you already have is
assumed, and the output says so.
"""

from __future__ import annotations

import json

import click

MAX_SUGGESTED_NODES = 8


def _network(node_gbps: float | None):
    from ftplan.planner.estimate.internode import node_network

    return node_network("ssh", "your machines", ssh_gbps=node_gbps)


def _fewest_nodes(req, gpu, gpus_per_node: int, nodes: int, network) -> int | None:
    """The fewest nodes (more than asked, up to 8) whose GPUs hold the job; None when none does."""
    from ftplan.planner.estimate.internode import estimate_nodes

    for n in range(nodes + 1, MAX_SUGGESTED_NODES + 1):
        if estimate_nodes(req, gpu, gpus_per_node, n, network).estimate.fits:
            return n
    return None


def _network_fields(nodes: int, gpus_per_node: int, network) -> dict:
    return {"nodes": nodes, "gpus_per_node": gpus_per_node, "network": network.describe(),
            "network_source": network.source}


def run_multinode(req, how, gpu_name: str | None, gpus_per_node: int, nodes: int, node_gbps: float | None,
                  as_json: bool, settings: dict) -> None:
    from ftplan.planner.commands import estimate as cmd
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus
    from ftplan.planner.estimate.internode import estimate_nodes
    from ftplan.results import EstimateResult, FitHint

    network = _network(node_gbps)
    if gpu_name is not None:
        gpu = resolve_gpu(gpu_name)
        mn = estimate_nodes(req, gpu, gpus_per_node, nodes, network)
        more = None if mn.estimate.fits else _fewest_nodes(req, gpu, gpus_per_node, nodes, network)
        hints = [FitHint("nodes", f"--nodes {more}")] if more else []
        if as_json:
            out = EstimateResult(model=req.model.name, method=req.method, gpu_count=gpus_per_node,
                                 rows=[mn.estimate], single_gpu=True, would_fit=hints, dataset=how,
                                 settings=settings).to_dict()
            click.echo(json.dumps({**out, **_network_fields(nodes, gpus_per_node, network),
                                   "bounding_link": mn.bounding_link}))
            return
        click.echo(f"{nodes} nodes x {gpus_per_node} GPUs = {nodes * gpus_per_node} GPUs; "
                   f"network between nodes: {network.describe()} ({network.source})")
        click.echo(f"bounding link: {mn.bounding_link}")
        cmd._print_detail(req, mn.estimate, hints, how)
        return
    rows = [estimate_nodes(req, g, gpus_per_node, nodes, network) for g in table_gpus()]
    if as_json:
        out = EstimateResult(model=req.model.name, method=req.method, gpu_count=gpus_per_node,
                             rows=[r.estimate for r in rows], dataset=how, settings=settings).to_dict()
        for entry, r in zip(out["gpus"], rows, strict=True):
            entry["bounding_link"] = r.bounding_link
        click.echo(json.dumps({**out, **_network_fields(nodes, gpus_per_node, network)}))
        return
    click.echo(f"{nodes} nodes x {gpus_per_node} GPUs each; network between nodes: {network.describe()} "
               f"({network.source})")
    cmd._print_table(req, [r.estimate for r in rows])
    between = [r.estimate.gpu.name for r in rows if "between nodes" in r.bounding_link]
    if between:
        click.echo(f"the network bounds the step on: {', '.join(between)}; NVLink/PCIe inside each node on the rest")
    else:
        click.echo("the link inside each node bounds the step on every GPU (the network is faster)")
