"""Provisioning: walk the plan's offers, create one instance (intent row first), check its price, wait for it.
An offer of several nodes is created as one group, all or nothing (node_group.py).

A mixin of `ftplan.planner.launch.launcher.Launcher` (it uses the launcher's store, plan, guard and display),
kept apart so the state machine reads in one screen.
"""

from __future__ import annotations

import math
from typing import Any

from ftplan.planner.launch.launch_plan import Candidate, InstanceLost, LaunchFailed, NoCapacity
from ftplan.planner.launch.node_group import GroupUnavailable
from ftplan.planner.launch.teardown import UNMANAGED_PROVIDERS
from ftplan.planner.launch.teardown import scrubbed as _scrub


class ProvisionSteps:
    def _provision(self, public_key: str) -> tuple[int, Any, Candidate]:
        from ftplan.providers.base import InstanceRequest
        from ftplan.providers.errors import CapacityError, ProviderError, QuotaError

        p = self.plan
        self._enter("provisioning", "looking for capacity")
        errors: list[str] = []
        attempts = 0
        for idx, offer in enumerate(p.candidates):
            if idx in self.tried and not offer.spot:
                continue
            if attempts >= p.max_offer_tries:
                break
            refused = _price_problem(offer)
            if refused:
                errors.append(f"{offer.provider}/{offer.instance_type}: {refused}")
                self.store.add_event(self.run_id, "offer_refused", refused, phase="provisioning",
                                     data={"provider": offer.provider, "instance_type": offer.instance_type})
                continue
            if not self.guard.affordable(offer.price_hour * offer.nodes, self._remaining_hours(offer)):
                errors.append(f"{offer.provider}/{offer.instance_type}: over what is left of the budget")
                continue
            attempts += 1
            self.tried.add(idx)
            provider = self._provider(offer.provider)

            def request_for(offer: Candidate = offer, **node: Any) -> InstanceRequest:
                return InstanceRequest(
                    run_id=self.run_id, instance_type=offer.instance_type, gpu=offer.gpu, gpu_count=offer.gpu_count,
                    region=offer.region, zone=node.pop("zone", offer.zone), spot=offer.spot, ssh_public_key=public_key,
                    # every node's lifetime is the whole run's: what is left of the budget at all nodes' price
                    max_lifetime_s=int(self._hard_cap_s(offer.price_hour * offer.nodes) or 24 * 3600)
                    + int(p.pull_margin_s),
                    store_id=self.store.store_id, ssh_cidr=p.ssh_cidr,
                    cloud_type=(getattr(offer, "cloud", "") or "").upper() or None,  # RunPod secure/community
                    **node,
                )

            if offer.nodes > 1:
                self.display.phase("provisioning", f"{offer.nodes} x {offer.provider} {offer.instance_type} in "
                                                   f"{offer.region or '-'} at ${offer.price_all_nodes:.2f}/h")
                try:
                    row, inst = self._create_group(provider, offer, request_for)
                except GroupUnavailable as exc:
                    self.store.add_event(self.run_id, "no_capacity", str(exc), phase="provisioning",
                                         data={"provider": offer.provider, "instance_type": offer.instance_type,
                                               "nodes": offer.nodes})
                    errors.append(f"{offer.provider}/{offer.nodes} x {offer.instance_type}: {exc}")
                    continue
                offer = self.live[-1][2] if self.live else offer   # the price cross-check may have raised it
                self._record_offer(offer)
                return row, inst, offer
            req = request_for()
            row = self.store.add_instance_intent(
                self.run_id, offer.provider, instance_type=offer.instance_type, gpu=offer.gpu, region=offer.region,
                zone=offer.zone, spot=offer.spot, price_hour=offer.price_hour,
            )
            self.display.phase("provisioning", f"{offer.provider} {offer.instance_type} in {offer.region or '-'} "
                                               f"at ${offer.price_hour:.2f}/h")
            try:
                inst = provider.create(req)
            except Exception as exc:  # noqa: BLE001 - whatever the class, the instance may exist by now
                # A create can fail after the provider made the instance (a capacity error raised by a
                # failed cleanup, a timeout on the reply): sweep by run tag before trying anything else.
                # The row closes only when the sweep proved nothing is left; else teardown and gc retry it.
                swept = offer.provider in UNMANAGED_PROVIDERS or self._sweep_provider(
                    offer.provider, keep=tuple(i.id for _, i, _ in self.live))
                self.store.set_instance_state(row, "create_failed" if swept else "intent", error=_scrub(exc))
                if isinstance(exc, (CapacityError, QuotaError)):
                    self.store.add_event(self.run_id, "no_capacity", _scrub(exc), phase="provisioning",
                                         data={"provider": offer.provider, "instance_type": offer.instance_type})
                    errors.append(f"{offer.provider}/{offer.instance_type}: {_scrub(exc)}")
                    continue
                what = "" if isinstance(exc, ProviderError) else f"{type(exc).__name__}: "
                raise LaunchFailed(f"create on {offer.provider} failed: {what}{_scrub(exc)}") from None
            self.store.set_instance_created(row, inst.id, inst.to_dict())
            self.guard.start_billing(row, offer.price_hour)
            self.live.append((row, inst, offer))
            offer = self._cross_check_price(row, inst, offer)
            self._record_offer(offer)
            self.store.add_event(self.run_id, "instance_created", inst.id, phase="provisioning",
                                 data={"provider": offer.provider, "instance_type": offer.instance_type})
            return row, inst, offer
        raise NoCapacity("no capacity on any offer tried (" + "; ".join(errors or ["none affordable"]) + ")")

    def _record_offer(self, offer: Candidate) -> None:
        """The run's record names the offer it runs on; `price_hour` is what the whole run bills per hour."""
        self.store.update_run(self.run_id, provider=offer.provider, instance_type=offer.instance_type,
                              gpu=offer.gpu, gpu_count=offer.gpu_count, region=offer.region, spot=offer.spot,
                              price_hour=offer.price_all_nodes)

    def _cross_check_price(self, row: int, inst: Any, offer: Candidate) -> Candidate:
        """The provider's own price for the instance (where its API reports one, in `extra["price_hour"]`)
        against the plan's: the guard, the caps and the record use the higher of the two."""
        import dataclasses

        reported = _as_price((getattr(inst, "extra", None) or {}).get("price_hour"))
        if reported is None or reported <= offer.price_hour:
            return offer
        self.store.add_event(self.run_id, "price_mismatch",
                             f"{offer.provider} reports ${reported:.4f}/h for {inst.id}, the plan said "
                             f"${offer.price_hour:.4f}/h; budgeting with the higher", phase="provisioning",
                             data={"planned": offer.price_hour, "reported": reported})
        self.display.warn(f"{offer.provider} bills ${reported:.4f}/h, more than the planned ${offer.price_hour:.4f}/h")
        self.store.db.execute("UPDATE instances SET price_hour = ? WHERE id = ?", (reported, row))
        self.store.update_run(self.run_id, price_hour=reported)
        offer = dataclasses.replace(offer, price_hour=reported)
        since = self.store.get_instance(row).created_at
        self.guard.stop_billing(row, since)         # re-bill from creation at the higher price
        self.guard.start_billing(row, reported, since=since)
        self.live = [(r, i, offer if r == row else o) for r, i, o in self.live]
        return offer

    def _wait_ready(self, row: int, inst: Any) -> Any:
        from ftplan.providers.errors import CapacityError, InstanceGone

        self._enter("waiting", f"waiting for {inst.id} to boot")
        provider = self._provider(inst.provider)
        try:
            endpoint = provider.wait_ready(inst, self.plan.wait_ready_timeout_s)
        except (InstanceGone, CapacityError) as exc:
            raise InstanceLost(_scrub(exc)) from None
        self.store.set_instance_state(row, "ready", instance=inst.to_dict())
        return endpoint


def _as_price(value: Any) -> float | None:
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return price if math.isfinite(price) else None


def _price_problem(offer: Candidate) -> str:
    """Why an offer's price cannot be budgeted ("" when it can). A rented machine at $0 or an unknown price
    would switch off both budget caps (nothing ever projects over budget, no on-instance deadline)."""
    if offer.provider in UNMANAGED_PROVIDERS:
        return ""   # your own machine: nothing bills, so $0/h is honest
    price = _as_price(offer.price_hour)
    if price is None or price <= 0:
        return (f"refused: its price is {offer.price_hour!r} $/h; a rented machine needs a known price above 0 "
                "for the budget caps to work (fix price_hour, or refresh the catalog)")
    return ""
