"""Admission by memory: the bytes of request bodies and the pixels of images being decoded that one HTTP
worker holds at once.

What a request costs in time is the engine's to judge (deadline-aware admission: work that cannot finish
in time is refused at once); what it costs in memory is judged here, so a burst of cheap requests is
answered however many arrive together, while a burst of large bodies or large images is refused (429
with Retry-After) before it can exhaust the worker. A request always fits when nothing else is in
flight (config.py checks the worker budgets hold the largest single request), so no request is refused
forever.

The middleware opens one Reservation per model request when its body is in and releases it with the
response; the image decoder (inputs.decode_files, every protocol) adds the pixels it is about to decode,
read from the image headers, through the context variable.
"""

from __future__ import annotations

from contextvars import ContextVar

from service.api.errors import Overloaded
from service.metrics import Metrics


class MemoryBudget:
    """The totals of one HTTP worker."""

    def __init__(self, max_bytes: int, max_pixels: int, metrics: Metrics) -> None:
        self.limits = {"bytes": max_bytes, "pixels": max_pixels}
        self.held = {"bytes": 0, "pixels": 0}
        self.metrics = metrics

    def take(self, kind: str, amount: int) -> None:
        held, limit = self.held[kind], self.limits[kind]
        if held > 0 and held + amount > limit:
            self.metrics.rejections.labels("-", "-", "-", f"memory_{kind}").inc()
            setting = "VAE_MAX_INFLIGHT_BYTES" if kind == "bytes" else "VAE_MAX_INFLIGHT_PIXELS"
            raise Overloaded(f"this worker holds {held} {kind} of other requests; {amount} more would pass "
                             f"its limit of {limit} ({setting}); retry after the Retry-After seconds")
        self.held[kind] = held + amount

    def give(self, kind: str, amount: int) -> None:
        self.held[kind] -= amount


class Reservation:
    """What one request holds of its worker's budget, until release()."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = {"bytes": 0, "pixels": 0}

    def add(self, kind: str, amount: int) -> None:
        self.budget.take(kind, amount)  # raises Overloaded, holding nothing more
        self.held[kind] += amount

    def release(self) -> None:
        for kind, amount in self.held.items():
            self.budget.give(kind, amount)
            self.held[kind] = 0


current_reservation: ContextVar[Reservation | None] = ContextVar("vae_reservation", default=None)


def reserve_pixels(pixels: int) -> None:
    """Hold `pixels` for the current request (429 when the worker cannot); no-op outside a request."""
    reservation = current_reservation.get()
    if reservation is not None:
        reservation.add("pixels", pixels)
