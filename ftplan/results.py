"""The typed results `ftplan.estimate/plan/launch/runs` return; `to_dict()` is what the CLI's `--json` prints.

Plain dataclasses over the planner's own types (`Estimate`, `MemoryEstimate`, `RankedOffer`, `Rejected`,
`LaunchResult`), so a script reads `result.memory.total` or `result.offers[0].total_usd` with the same
names the JSON uses. Nothing here imports more than the standard library at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.estimator import Estimate
    from ftplan.planner.estimate.memory import MemoryEstimate
    from ftplan.planner.pricing.plan_result import RankedOffer, Rejected


@dataclass
class FitHint:
    """What would fit when the job does not fit the GPU asked for."""

    kind: str   # gpu_count | gpu | method | batch
    text: str


@dataclass
class EstimateResult:
    """`ftplan estimate`: one row per GPU type (all of them, or the one asked for with `gpu=`).

    `memory`, `fits`, `hours`, ... are the first row's; with `gpu=` that is the GPU asked for. The
    memory a job needs barely depends on the card, so `memory.total` is the answer to "how much"."""

    model: str
    method: str
    gpu_count: int
    rows: list[Estimate]
    single_gpu: bool = False                 # gpu= was given: the CLI's detailed view
    would_fit: list[FitHint] = field(default_factory=list)
    dataset: str | None = None               # how the dataset was counted, when one was given
    settings: dict[str, Any] | None = None   # the request's knobs as resolved (e.g. from a --from-config file)
    # nodes > 1 (`nodes=`): the network between them and, per row, the link that bounds the collectives
    network: dict[str, Any] | None = None    # nodes, gpus_per_node, network, network_source
    bounding_links: list[str] = field(default_factory=list)

    @property
    def estimate(self) -> Estimate:
        return self.rows[0]

    @property
    def memory(self) -> MemoryEstimate:
        return self.rows[0].memory

    @property
    def fits(self) -> bool:
        return self.rows[0].fits

    @property
    def tokens_per_s(self) -> float:
        return self.rows[0].tokens_per_s

    @property
    def hours(self) -> float | None:
        return self.rows[0].hours

    @property
    def training_tokens(self) -> int | None:
        return self.rows[0].training_tokens

    @property
    def params_total(self) -> int:
        return self.memory.params_total

    @property
    def params_trainable(self) -> int:
        return self.memory.params_trainable

    @property
    def notes(self) -> list[str]:
        return list(self.rows[0].notes)

    def for_gpu(self, name: str) -> Estimate:
        """The row of one GPU type (catalog name or alias, e.g. 'a100-80gb', 'L4')."""
        from ftplan.planner.estimate.gpus import resolve_gpu

        want = resolve_gpu(name).name
        for row in self.rows:
            if row.gpu.name == want:
                return row
        from ftplan.planner.errors import UserError

        raise UserError(f"GPU {want} is not in this estimate; estimate(..., gpu='{name}') asks for it")

    def to_dict(self) -> dict[str, Any]:
        """Exactly what `ftplan estimate ... --json` prints for the same arguments."""
        head = {"model": self.model, "method": self.method, "params_total": self.params_total,
                "params_trainable": self.params_trainable}
        if self.single_gpu:
            out = {**head, **self.estimate.as_dict(),
                   "would_fit": [{"kind": s.kind, "text": s.text} for s in self.would_fit]}
            if self.dataset:
                out["dataset"] = self.dataset
        else:
            out = {**head, "gpu_count": self.gpu_count, "memory_gib": self.memory.as_dict(),
                   "training_tokens": self.training_tokens,
                   "gpus": [{"gpu": e.gpu.name, "fits": e.fits, "headroom_gib": round(e.headroom_gib, 2),
                             "memory_gib": e.memory.as_dict(), "throughput_tokens_per_s": round(e.tokens_per_s, 1),
                             "hours": None if e.hours is None else round(e.hours, 3)} for e in self.rows]}
        if self.settings is not None:
            out["settings"] = dict(self.settings)
        if self.network is not None:  # as `ftplan estimate --nodes N --json` adds them
            if self.single_gpu:
                out["bounding_link"] = self.bounding_links[0]
            else:
                for entry, link in zip(out["gpus"], self.bounding_links, strict=True):
                    entry["bounding_link"] = link
            out.update(self.network)
        return out


@dataclass
class CatalogInfo:
    provider: str
    origin: str
    retrieved_at: str
    age_days: float | None
    price_dates: list[str] = field(default_factory=list)   # the data's own dates, where rows carry one
    undated_rows: int = 0


@dataclass
class PlanResult:
    """`ftplan plan`: ranked offers (cheapest expected total first), the Pareto frontier, and rejections."""

    model: str
    method: str
    budget_usd: float | None
    headroom: float
    market: str
    considered: int
    feasible: int
    offers: list[RankedOffer]
    frontier: list[RankedOffer]
    rejected: list[Rejected]
    catalogs: list[CatalogInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    corrections: list[str] = field(default_factory=list)
    secure_only: bool = False
    loss: str = "standard"                   # the cross-entropy the memory was estimated for

    @property
    def best(self) -> RankedOffer:
        return self.offers[0]

    @classmethod
    def build(cls, request: Any, result: Any, table: Any, lines: list[RankedOffer], *, budget: float | None,
              headroom: float, market: str, secure_only: bool, warnings: list[str],
              corrections: dict[str, Any]) -> PlanResult:
        """From what `ftplan plan` computed (the optimizer's result, the offer table, the lines it shows)."""
        return cls(
            model=request.model.name, method=request.method, budget_usd=budget, headroom=headroom, market=market,
            considered=result.considered, feasible=len(result), offers=lines, secure_only=secure_only,
            frontier=result.frontier(), rejected=list(result.rejected),
            catalogs=[CatalogInfo(f.provider, f.origin, str(f.oldest), f.age_days(), list(f.price_dates or ()),
                                  f.undated) for f in table.files],
            warnings=warnings, corrections=[c.note() for c in corrections.values()], loss=request.loss)

    def to_dict(self) -> dict[str, Any]:
        """Exactly what `ftplan plan ... --json` prints for the same arguments."""
        return {
            "model": self.model, "method": self.method, "budget_usd": self.budget_usd, "headroom": self.headroom,
            "market": self.market, "considered": self.considered, "feasible": self.feasible,
            "secure_only": self.secure_only, "loss": self.loss,
            "catalogs": [{"provider": c.provider, "origin": c.origin, "retrieved_at": c.retrieved_at,
                          "age_days": c.age_days, "price_dates": list(c.price_dates), "undated_rows": c.undated_rows}
                         for c in self.catalogs],
            "warnings": list(self.warnings), "corrections": list(self.corrections),
            "offers": [o.to_dict() for o in self.offers],
            "frontier": [o.to_dict() for o in self.frontier],
            "rejected": [r.to_dict() for r in self.rejected],
        }


@dataclass
class HoursUsd:
    hours: float | None
    usd: float | None


@dataclass
class RunSummary:
    """One recorded run, as `ftplan runs` lists it."""

    run_id: str
    created_at: str | None
    model: str | None
    method: str | None
    provider: str | None
    instance_type: str | None
    gpu: str | None
    status: str
    estimated: HoursUsd
    actual: HoursUsd
    budget_usd: float | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        keys = ("run_id", "created_at", "model", "method", "provider", "instance_type", "gpu", "status",
                "budget_usd")
        return cls(**{k: d[k] for k in keys}, estimated=HoursUsd(**d["estimated"]), actual=HoursUsd(**d["actual"]))

    def to_dict(self) -> dict[str, Any]:
        """One element of `ftplan runs --json`."""
        return {
            "run_id": self.run_id, "created_at": self.created_at, "model": self.model, "method": self.method,
            "provider": self.provider, "instance_type": self.instance_type, "gpu": self.gpu,
            "status": self.status,
            "estimated": {"hours": self.estimated.hours, "usd": self.estimated.usd},
            "actual": {"hours": self.actual.hours, "usd": self.actual.usd},
            "budget_usd": self.budget_usd,
        }


@dataclass
class LaunchPreview:
    """`ftplan launch --dry-run`: what a launch would act on, nothing started."""

    summary: dict[str, Any]   # run_id, model, method, dataset, budget_usd, estimated, offer, fallbacks, notes

    @property
    def run_id(self) -> str:
        return self.summary["run_id"]

    @property
    def offer(self) -> dict[str, Any] | None:
        return self.summary.get("offer")

    @property
    def estimated(self) -> dict[str, Any]:
        return self.summary.get("estimated", {})

    @property
    def budget_usd(self) -> float | None:
        return self.summary.get("budget_usd")

    @property
    def notes(self) -> list[str]:
        return list(self.summary.get("notes", []))

    def to_dict(self) -> dict[str, Any]:
        """Exactly what `ftplan launch --dry-run --json` prints."""
        return {"dry_run": True, **self.summary}
