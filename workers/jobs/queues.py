"""The job queues' names, shared by the API (which fills them) and the workers (which take from them)."""

from __future__ import annotations

QUEUE_NAME = "strata"
# Background work nobody waits for (profiles queued at registration or by serving). `strata serve` runs a
# worker of its own for it, so a user's job never waits behind it.
BACKGROUND_QUEUE_NAME = "strata-background"
QUEUE_NAMES = (QUEUE_NAME, BACKGROUND_QUEUE_NAME)  # in priority order
# `strata worker --queue ...`: which of them a worker takes from
WORKER_QUEUES = {"user": (QUEUE_NAME,), "background": (BACKGROUND_QUEUE_NAME,), "all": QUEUE_NAMES}
