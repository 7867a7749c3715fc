#!/usr/bin/env python3
"""Import the SkyPilot catalog snapshots into ftplan's own offer files (catalogs/offers/<provider>.csv).

    python scripts/import_catalogs.py [--src ../shared/catalog-snapshots] [--out catalogs/offers] [--date YYYY-MM-DD]

Run offline, by a maintainer; `ftplan` never reads the snapshots at run time. Every provider's rows are
mapped onto one explicit column list (ftplan.planner.pricing.offers.COLUMNS), validated with pydantic, deduplicated,
and written sorted so that re-running gives a byte-identical file. Whatever is dropped or looks
anomalous is printed in the summary with its reason (see catalogs/offers/SOURCES.md for the rules).
"""

from __future__ import annotations

import argparse
import ast
import collections
import csv
import datetime as dt
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftplan.planner.errors import UserError  # noqa: E402
from ftplan.planner.estimate.gpus import load_gpus, resolve_gpu  # noqa: E402
from ftplan.planner.pricing.offers import COLUMNS, PROVIDERS, offer_key, write_offers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import published_lists as PL  # noqa: E402

# Upstream file versions (see the snapshot README); recorded in each row's `source`.
UPSTREAM = {
    "aws": "skypilot-catalog v8/aws/vms.csv @00148f2a",
    "gcp": "skypilot-catalog v8/gcp/vms.csv @006059e0",
    "lambda": "skypilot-catalog v8/lambda/vms.csv @0f407038",
    "runpod": "skypilot-catalog v7/runpod/vms.csv @0727c2bd",
    "paperspace": "skypilot-catalog v6/paperspace/vms.csv @e5200541",
}
# Seconds a provider bills in (SOURCES.md gives the evidence; minimum charges live in provider_overheads.json).
BILLING_GRANULARITY_S = {"aws": 1, "gcp": 1, "runpod": 1, "lambda": 60, "paperspace": 1}

# GCP: which host machine types carry which GPU (a2/a3/a4/g2 have them built in; n1 takes attachable GPUs).
GCP_BUILT_IN = {
    "A100": ("a2-highgpu-", "a2-megagpu-"),
    "A100-80GB": ("a2-ultragpu-",),
    "H100": ("a3-highgpu-", "a3-edgegpu-"),
    "H100-MEGA": ("a3-megagpu-",),
    "H200": ("a3-ultragpu-",),
    "B200": ("a4-highgpu-",),
    "L4": ("g2-standard-",),
}
GCP_G2_GPUS = {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1,
               "g2-standard-32": 1, "g2-standard-24": 2, "g2-standard-48": 4, "g2-standard-96": 8}
# n1 + attachable GPU: most vCPUs an n1 host may have for that GPU count (GCP's GPU platform table).
GCP_N1_MAX_VCPUS = {
    "T4": {1: 48, 2: 48, 4: 96},
    "V100": {1: 12, 2: 24, 4: 48, 8: 96},
    "P100": {1: 16, 2: 32, 4: 64},
    "P4": {1: 24, 2: 48, 4: 96},
}
# Hosts composed with an attachable GPU: 4 and 8 vCPUs per GPU, standard and highmem shapes.
GCP_N1_VCPUS_PER_GPU = (4, 8)
OUTLIER_FACTOR = 1.5  # GCP GPU component vs the median of the same GPU x count across zones
# A GCP GPU "on-demand" component this close to its own spot price, or this far below the same GPU's dearest
# zone, is not the on-demand SKU (a flex-start/DWS or commitment SKU, about half the list price).
NOT_ON_DEMAND_SPOT_RATIO = 1.5
NOT_ON_DEMAND_FRACTION = 0.6


class Report:
    """Counts of dropped rows by reason and notable facts, printed per provider."""

    def __init__(self, provider: str):
        self.provider = provider
        self.read = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.fixed: collections.Counter[str] = collections.Counter()
        self.notes: list[str] = []

    def print(self, kept: int, out: Path) -> None:
        print(f"{self.provider}: read {self.read} upstream rows, wrote {kept} offers to {out}")
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            print(f"  dropped {n:5d}  {reason}")
        for reason, n in sorted(self.fixed.items(), key=lambda kv: -kv[1]):
            print(f"  changed {n:5d}  {reason}")
        for note in self.notes:
            print(f"  flagged        {note}")


def read_upstream(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:  # CRLF (Lambda, RunPod) is handled by csv
        return list(csv.DictReader(fh))


def fnum(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def mib_per_gpu(gpu_info: str) -> float | None:
    """Per-GPU memory from SkyPilot's GpuInfo literal; None when it holds only a name (RunPod, Paperspace)."""
    if not gpu_info or not gpu_info.startswith("{"):
        return None
    info = ast.literal_eval(gpu_info)
    size = info["Gpus"][0].get("MemoryInfo", {}).get("SizeInMiB")
    return float(size) if size else None


def canonical_gpu(name: str, report: Report) -> str | None:
    try:
        return resolve_gpu(name).name
    except UserError:
        report.dropped[f"GPU '{name}' is not in catalogs/gpus.json"] += 1
        return None


def gpu_memory_gib(gpu: str, mib: float | None) -> float:
    """The provider's own per-GPU figure where it publishes one, else the GPU table's marketed size."""
    if mib:
        return round(mib / 1024, 2)
    return load_gpus()[gpu].memory_gib


def spot_or_none(provider: str, price: float, spot: float | None, report: Report, what: str) -> float | None:
    """Keep a spot price only where it is a real discount (spot >= on-demand means no spot market)."""
    if spot is None or spot <= 0:
        return None
    if spot > price:
        report.fixed[f"{what}: spot above on-demand -> no spot offer"] += 1
        return None
    if spot == price:
        report.fixed[f"{what}: spot equal to on-demand -> no spot offer"] += 1
        return None
    return spot


def offer(provider: str, instance_type: str, gpu: str, count: int, mem: float, vcpus, ram, price: float,
          spot, region: str, zone: str, retrieved_at: str, *, source: str | None = None, price_date: str = "",
          cloud: str = "", purchase: str | None = None) -> dict:
    if purchase is None:
        purchase = "on-demand+spot" if spot is not None else "on-demand"
    return {
        "provider": provider, "instance_type": instance_type, "gpu": gpu, "gpu_count": count,
        "gpu_memory_gib": mem, "vcpus": vcpus, "ram_gib": ram, "price_hour": round(price, 6),
        "spot_price_hour": round(spot, 6) if spot is not None else None, "region": region, "zone": zone,
        "billing_granularity_s": BILLING_GRANULARITY_S[provider], "source": source or UPSTREAM[provider],
        "retrieved_at": retrieved_at, "cloud": cloud, "purchase": purchase, "price_date": price_date,
    }


def whole_gpus(text: str, report: Report) -> int | None:
    count = fnum(text)
    if count is None:
        report.dropped["CPU-only instance type"] += 1
        return None
    if count != int(count) or count < 1:
        report.dropped[f"fractional GPU ({count:g} of a GPU): a slice cannot hold a training job"] += 1
        return None
    return int(count)


# --------------------------------------------------------------------------- per provider

def import_simple(provider: str, rows: list[dict], report: Report, retrieved_at: str) -> list[dict]:
    """AWS, Lambda, RunPod, Paperspace: one upstream row is one offer."""
    out = []
    for r in rows:
        report.read += 1
        count = whole_gpus(r["AcceleratorCount"], report)
        if count is None:
            continue
        if provider == "aws" and r.get("Arch") not in ("x86_64", "i386"):
            report.dropped[f"{r.get('Arch')} host ({r['InstanceType'].split('.')[0]}): the job image is x86_64 only"] += 1
            continue
        gpu = canonical_gpu(r["AcceleratorName"], report)
        if gpu is None:
            continue
        price, spot = fnum(r["Price"]), fnum(r["SpotPrice"])
        if price is None or price <= 0:
            report.dropped[f"{r['InstanceType']}: no on-demand price upstream"] += 1
            continue
        if provider == "runpod" and gpu == "L40S" and spot is not None and spot > price:
            # Upstream swapped the two columns for L40S (README): on-demand is the higher figure.
            price, spot = spot, price
            report.fixed["L40S: spot and on-demand columns swapped upstream -> swapped back"] += 1
        spot = spot_or_none(provider, price, spot, report, provider)
        mem = gpu_memory_gib(gpu, mib_per_gpu(r.get("GpuInfo", "")))
        out.append(offer(provider, r["InstanceType"], gpu, count, mem, fnum(r["vCPUs"]), fnum(r["MemoryGiB"]),
                         price, spot, r["Region"], r.get("AvailabilityZone", "") or "", retrieved_at))
    return out


def gcp_hosts_for(gpu: str, count: int, hosts: dict[str, dict]) -> list[str]:
    """Host machine types (present in this zone) that can carry `count` x `gpu`."""
    names = []
    if gpu in GCP_BUILT_IN:
        for name in hosts:
            if not name.startswith(GCP_BUILT_IN[gpu]):
                continue
            if gpu == "L4":
                built_in = GCP_G2_GPUS.get(name)
            else:
                m = re.search(r"-(\d+)g(?:-|$)", name)
                built_in = int(m.group(1)) if m else None
            if built_in == count:
                names.append(name)
    elif gpu in GCP_N1_MAX_VCPUS:
        limit = GCP_N1_MAX_VCPUS[gpu].get(count)
        if limit is None:
            return []
        for per_gpu in GCP_N1_VCPUS_PER_GPU:
            vcpus = min(per_gpu * count, limit)
            for family in ("n1-standard", "n1-highmem"):
                name = f"{family}-{vcpus}"
                if name in hosts and name not in names:
                    names.append(name)
    return names


def import_gcp(rows: list[dict], report: Report, retrieved_at: str) -> list[dict]:
    """GCP: an offer is a host-VM row plus the GPU-price row of the same zone (README 'How GCP prices are composed')."""
    hosts_by_zone: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    gpu_rows = []
    for r in rows:
        report.read += 1
        if r["InstanceType"]:
            hosts_by_zone[r["AvailabilityZone"]][r["InstanceType"]] = r
        else:
            gpu_rows.append(r)

    # Flag GPU components far from the median of the same GPU x count (upstream anomalies, kept visible).
    by_kind = collections.defaultdict(list)
    for r in gpu_rows:
        by_kind[(r["AcceleratorName"], r["AcceleratorCount"])].append(r)
    for (name, cnt), group in sorted(by_kind.items()):
        med = statistics.median(float(r["Price"]) for r in group)
        odd = sorted({(r["Region"], float(r["Price"])) for r in group
                      if float(r["Price"]) > med * OUTLIER_FACTOR or float(r["Price"]) < med / OUTLIER_FACTOR})
        if odd:
            shown = ", ".join(f"{reg} {p:g}" for reg, p in odd[:4]) + (" ..." if len(odd) > 4 else "")
            report.notes.append(f"GCP {name} x{cnt} GPU price off the median {med:g} $/h by >1.5x (kept): {shown}")

    # The dearest per-GPU on-demand component of each GPU: a zone far below it is priced with another SKU.
    dearest: dict[str, float] = collections.defaultdict(float)
    for r in gpu_rows:
        n = fnum(r["AcceleratorCount"]) or 1
        dearest[r["AcceleratorName"]] = max(dearest[r["AcceleratorName"]], float(r["Price"]) / n)

    out, used_hosts = [], set()
    zero_host = set()
    for g in gpu_rows:
        count = whole_gpus(g["AcceleratorCount"], report)
        if count is None:
            continue
        gpu = canonical_gpu(g["AcceleratorName"], report)
        if gpu is None:
            continue
        zone = g["AvailabilityZone"]
        hosts = hosts_by_zone.get(zone, {})
        names = gcp_hosts_for(gpu, count, hosts)
        if not names:
            report.dropped["GCP GPU price without a matching host VM in that zone"] += 1
            continue
        gpu_price, gpu_spot = fnum(g["Price"]), fnum(g["SpotPrice"])
        mem = gpu_memory_gib(gpu, mib_per_gpu(g["GpuInfo"]))
        source, price_date, od_sold = None, "", True
        if gpu_price and not_on_demand_sku(gpu_price, gpu_spot, dearest[g["AcceleratorName"]] * count):
            listed = PL.GCP_GPU_LIST.get((gpu, g["Region"]))
            if listed is not None:
                report.fixed[f"gcp {gpu}: GPU price is not the on-demand SKU (x{gpu_price / (listed * count):.2f} "
                             f"of list) -> on-demand list price"] += 1
                gpu_price = listed * count
                source, price_date = PL.GCP_SOURCE
            else:
                report.fixed[f"gcp {gpu}: GPU price is not the on-demand SKU and no list price is at hand "
                             f"-> no on-demand offer"] += 1
                od_sold = False
        for name in names:
            h = hosts[name]
            used_hosts.add((zone, name))
            host_price, host_spot = fnum(h["Price"]), fnum(h["SpotPrice"])
            if host_price == 0:
                zero_host.add(name)  # a4: the whole VM is priced in the GPU SKU; the sum is still right
            if gpu_price is None or host_price is None or gpu_price + host_price <= 0:
                report.dropped["GCP host or GPU without an on-demand price"] += 1
                continue
            price = gpu_price + host_price
            spot = None
            if gpu_spot is not None and host_spot is not None:
                spot = spot_or_none("gcp", price, gpu_spot + host_spot, report, f"gcp {gpu}")
            elif gpu_spot is None:
                report.fixed[f"gcp {gpu}: no spot price for the GPU upstream -> no spot offer"] += 1
            purchase = gcp_purchase(name, spot is not None, od_sold)
            if purchase is None:
                report.dropped["GCP offer sold neither on demand nor on spot here"] += 1
                continue
            out.append(offer("gcp", name, gpu, count, mem, fnum(h["vCPUs"]), fnum(h["MemoryGiB"]), price, spot,
                             g["Region"], zone, retrieved_at, source=source, price_date=price_date,
                             purchase=purchase))
    for name in sorted(zero_host):
        report.notes.append(f"GCP {name} host VM is priced 0.0 upstream: its price is all in the GPU row (kept)")
    n_hosts = sum(len(h) for h in hosts_by_zone.values())
    report.notes.append(f"GCP composed offers from {len(gpu_rows)} GPU-price rows and {n_hosts} host-VM rows "
                        f"({len(used_hosts)} host rows used; the others carry no GPU we compose)")
    return out


def not_on_demand_sku(price: float, spot: float | None, dearest: float) -> bool:
    """Is a GCP GPU 'on-demand' component really another SKU? Google's spot GPU prices are 60-91 % off list,
    so an on-demand figure within 1.5x of its own spot price, or below 60 % of the same GPU's dearest zone
    (list prices differ by region far less), is a flex-start/DWS or commitment SKU (issue 21: H100 x0.44-0.49,
    A100-80GB x0.58, A100 x0.65 of list)."""
    if spot and price / spot < NOT_ON_DEMAND_SPOT_RATIO:
        return True
    return price < NOT_ON_DEMAND_FRACTION * dearest


def gcp_purchase(machine_type: str, has_spot: bool, on_demand_sold: bool = True) -> str | None:
    """How a GCP machine type can be bought (PL.GCP_NO_ON_DEMAND: reservation, spot or flex-start only)."""
    modes = []
    reserved_only = machine_type.startswith(PL.GCP_NO_ON_DEMAND)
    if on_demand_sold and not reserved_only:
        modes.append("on-demand")
    if has_spot:
        modes.append("spot")
    if not modes:
        return None
    if reserved_only:
        modes.append("flex-start")
        if machine_type.startswith(("a4-highgpu-", "a3-ultragpu-")):
            modes.append("reservation")
    return "+".join(modes)


def dedupe(rows: list[dict], report: Report) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for r in rows:
        key = offer_key(r)
        if key in seen:
            if seen[key] == r:
                report.dropped["exact duplicate of another row upstream"] += 1
            else:
                report.dropped["same offer listed twice with different values upstream (kept the cheaper)"] += 1
                if r["price_hour"] < seen[key]["price_hour"]:
                    seen[key] = r
            continue
        seen[key] = r
    return list(seen.values())


def sort_key(r: dict) -> tuple:
    return (r["gpu"], r["gpu_count"], r["instance_type"], r["region"], r["zone"], r["cloud"])


# --------------------------------------------------------------------------- this year's published lists

def apply_runpod(rows: list[dict], report: Report) -> list[dict]:
    """Secure-cloud rows at the published list (per GPU x count); community cloud as offers of its own.

    A list price replaces the mid-2025 figure and its spot price (no dated 2026 spot figure: `ftplan catalog
    refresh` reads spot live). Community rows have no data centre (RunPod places them; hosts vary, no SLA)."""
    out, community, undated = [], {}, set()
    for r in rows:
        r["cloud"] = "secure"
        listed = PL.RUNPOD_LIST.get(r["gpu"])
        if listed and listed[0] is not None:
            secure, _, (source, day) = listed
            new = round(secure * r["gpu_count"], 6)
            if abs(new - r["price_hour"]) > 1e-9:
                report.fixed[f"runpod {r['gpu']}: secure {r['price_hour'] / r['gpu_count']:g} -> {secure:g} "
                             "$/GPU-h (published list)"] += 1
            if r["spot_price_hour"] is not None:
                report.fixed["runpod: mid-2025 spot price of a re-priced type dropped (no dated figure)"] += 1
            r.update(price_hour=new, spot_price_hour=None, source=source, price_date=day, purchase="on-demand")
        else:
            undated.add(r["gpu"])
        out.append(r)
        if listed and listed[1] is not None:
            key = (r["gpu"], r["gpu_count"])
            if key not in community:
                _, comm, (source, day) = listed
                community[key] = {**r, "instance_type": r["instance_type"].replace("_SECURE", "_COMMUNITY"),
                                  "price_hour": round(comm * r["gpu_count"], 6), "spot_price_hour": None,
                                  "region": "ANY", "zone": "", "cloud": "community", "source": source,
                                  "price_date": day, "purchase": "on-demand"}
    if undated:
        report.notes.append(f"runpod: no dated 2026 price at hand, mid-2025 snapshot kept: {', '.join(sorted(undated))}")
    report.fixed["runpod: community-cloud offers added (published list)"] += len(community)
    return out + list(community.values())


def _paperspace_base(instance_type: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.+?)x(\d+)", instance_type)
    return (m.group(1), int(m.group(2))) if m else (instance_type, 1)


def apply_paperspace(rows: list[dict], report: Report, retrieved_at: str) -> list[dict]:
    """Prices from Paperspace's pricing page (multi-GPU types: n x the single price); per-second billing."""
    source, day = PL.PAPERSPACE_SOURCE
    region = rows[0]["region"] if rows else "East Coast (NY2)"
    for r in rows:
        base, n = _paperspace_base(r["instance_type"])
        if base in PL.PAPERSPACE_LIST:
            new = round(PL.PAPERSPACE_LIST[base] * n, 6)
            if abs(new - r["price_hour"]) > 1e-9:
                report.fixed[f"paperspace {r['instance_type']}: {r['price_hour']:g} -> {new:g} $/h "
                             "(published list)"] += 1
            r.update(price_hour=new, source=source, price_date=day)
    have = {r["instance_type"] for r in rows}
    for itype, gpu in PL.PAPERSPACE_NEW.items():
        if itype in have:
            continue
        mem = load_gpus()[gpu].memory_gib
        rows.append(offer("paperspace", itype, gpu, 1, mem, None, None, PL.PAPERSPACE_LIST[itype], None,
                          region, "", retrieved_at, source=source, price_date=day))
        report.fixed[f"paperspace {itype}: added ({gpu}, published list)"] += 1
    return rows


def apply_lambda(rows: list[dict], report: Report, retrieved_at: str) -> list[dict]:
    """Check every type against Lambda's published per-GPU list; add listed types the snapshot lacks."""
    source, day = PL.LAMBDA_SOURCE
    for r in rows:
        per_gpu = PL.LAMBDA_LIST.get(r["instance_type"])
        if per_gpu is None:
            report.notes.append(f"lambda {r['instance_type']}: not on the published list (kept, undated)")
            continue
        if abs(per_gpu * r["gpu_count"] - r["price_hour"]) > 0.005:
            report.notes.append(f"lambda {r['instance_type']}: snapshot {r['price_hour']:g} != list "
                                f"{per_gpu * r['gpu_count']:g} (list used)")
            r["price_hour"] = round(per_gpu * r["gpu_count"], 6)
        r.update(source=source, price_date=day)
    regions = sorted({r["region"] for r in rows})
    for itype, (gpu, count, vcpus, ram) in PL.LAMBDA_NEW.items():
        if any(r["instance_type"] == itype for r in rows):
            continue
        mem = next((r["gpu_memory_gib"] for r in rows if r["gpu"] == gpu), load_gpus()[gpu].memory_gib)
        for region in regions:
            rows.append(offer("lambda", itype, gpu, count, mem, vcpus, ram, PL.LAMBDA_LIST[itype] * count, None,
                              region, "", retrieved_at, source=source, price_date=day))
        report.fixed[f"lambda {itype}: added ({count}x {gpu}, published list) in every listed region"] += len(regions)
    return rows


def import_provider(provider: str, src: Path, out_dir: Path, retrieved_at: str) -> int:
    report = Report(provider)
    rows = read_upstream(src / provider / "vms.csv")
    if provider == "gcp":
        offers = import_gcp(rows, report, retrieved_at)
    else:
        offers = import_simple(provider, rows, report, retrieved_at)
    if provider == "runpod":
        offers = apply_runpod(dedupe(offers, report), report)
    elif provider == "paperspace":
        offers = apply_paperspace(offers, report, retrieved_at)
    elif provider == "lambda":
        offers = apply_lambda(offers, report, retrieved_at)
    offers = sorted(dedupe(offers, report), key=sort_key)
    report.dropped = collections.Counter({k: v for k, v in report.dropped.items() if v})
    out = out_dir / f"{provider}.csv"
    n = write_offers(out, offers)
    report.print(n, out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT.parent / "shared" / "catalog-snapshots")
    ap.add_argument("--out", type=Path, default=ROOT / "catalogs" / "offers")
    ap.add_argument("--date", default=dt.date.today().isoformat(),
                    help="retrieved_at to record (default: today; the upstream date is unknown)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    args = ap.parse_args(argv)
    dt.date.fromisoformat(args.date)
    assert len(COLUMNS) == 17
    total = 0
    for provider in args.providers.split(","):
        total += import_provider(provider, args.src, args.out, args.date)
    print(f"total: {total} offers, retrieved_at {args.date} (the snapshot's own date is unknown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
