"""Prometheus metrics of generation requests, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

TIME_TO_FIRST_TOKEN = Histogram(
    "strata_time_to_first_token_seconds",
    "Arrival to first streamed token",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    "strata_inter_token_latency_seconds",
    "Time between consecutive tokens",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
END_TO_END = Histogram(
    "strata_request_latency_seconds", "Arrival to last token", ["model"], buckets=LATENCY_BUCKETS
)
QUEUE_TIME = Histogram(
    "strata_queue_time_seconds", "Waiting for an inference worker", ["model"], buckets=LATENCY_BUCKETS
)
DEPTH = Histogram(
    "strata_chosen_depth",
    "Exit depth chosen per request",
    ["model"],
    buckets=(1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64),
)
BUDGET = Counter("strata_budget_total", "Requests with a latency budget, by outcome", ["model", "outcome"])
ROUTED = Counter(
    "strata_requests_routed_total",
    "Generation requests queued, by how their worker was chosen (affinity: it holds the base; assigned: "
    "the base is loading there; spilled: a hot base spread to an empty worker; new: a new base for the "
    "emptiest worker; shared: no worker reports; "
    "resubmitted: sent again after its worker died)",
    ["how"],
)
REJECTED = Counter("strata_requests_rejected_total", "Generation requests refused", ["reason"])
RESIDENT_BASES = Gauge(
    "strata_resident_bases", "Bases (and plain models) loaded, per inference worker", ["worker"]
)
BASE_LOADS = Gauge(
    "strata_base_loads",
    "Times an inference worker has loaded a base it holds (above 1: it was dropped and loaded again)",
    ["worker", "base"],
)
RESIDENT_VARIANTS = Gauge(
    "strata_resident_variants",
    "Variants held as deltas over a base, per inference worker",
    ["worker", "base"],
)
RESIDENT_VARIANT_BYTES = Gauge(
    "strata_resident_variant_bytes",
    "Bytes of the deltas held over a base, per inference worker",
    ["worker", "base"],
)


def observe_residency(resident: dict[str, dict]) -> None:
    """Set the residency gauges from the workers' reports (as /health last read them)."""
    for gauge in (RESIDENT_BASES, BASE_LOADS, RESIDENT_VARIANTS, RESIDENT_VARIANT_BYTES):
        gauge.clear()
    for worker, bases in resident.items():
        RESIDENT_BASES.labels(worker).set(len(bases))
        for base, held in bases.items():
            BASE_LOADS.labels(worker, base).set(held.get("loads", 1))
            RESIDENT_VARIANTS.labels(worker, base).set(len(held.get("variants", [])))
            RESIDENT_VARIANT_BYTES.labels(worker, base).set(held.get("variant_bytes", 0))
