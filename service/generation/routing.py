"""Routing generation requests by base, so that inference workers serving several bases do not thrash.

Every inference worker takes requests from a list of its own before the shared one (workers.inference.
protocol), and reports the bases it holds and how many it keeps (its capacity, `--max-models`). A
request for base B (a variant's base, or the model itself) goes to:
1. a live worker whose residency report holds B (affinity), the one with the fewest requests waiting;
2. else a live worker B was routed to within CLAIM_S and that does not report it yet (its load is in
   flight): "assigned";
   in 1 and 2, when that worker has SPILL_WAITING requests waiting or more and another worker has room
   for B (it holds and is claimed for fewer bases than its capacity, so taking B drops nothing), B
   spreads to the one of those holding fewest ("spilled": a hot base gets more workers, and nothing is
   dropped for it);
3. else a worker with room before a full one, then the one holding (or claimed for) the fewest bases,
   then with the fewest waiting; B is claimed for it ("new"). That choice is made again inside Redis,
   atomically with the claim (CLAIM_NEW), so concurrent requests (API threads or processes) see each
   other's claims;
4. with no live worker reporting its residency, the shared list, which any worker takes from.
A worker that does not report its capacity counts as keeping one base. A dead worker drops out at once
(heartbeat and process are checked before routing); what was routed to it and not answered is sent again
by the waiting request (`Generation.events`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from redis import Redis

from workers.inference.protocol import (
    CLAIM_S,
    EVENTS_TTL_S,
    QUEUE_KEY,
    capacity_key,
    capacity_of,
    claims_key,
    resident_key,
    worker_queue_key,
)
from workers.store.registry import ModelRecord

How = Literal["affinity", "assigned", "spilled", "new", "shared"]
SPILL_WAITING = 8  # a full batch (the workers' default --max-batch-size) waiting behind the current one


@dataclass(frozen=True)
class WorkerLoad:
    id: str
    bases: frozenset[str]  # reported as loaded
    waiting: int  # requests in its own list
    claimed: frozenset[str] = frozenset()  # routed to it within CLAIM_S, not reported yet
    capacity: int = 1  # bases it keeps loaded (1 when it does not say)

    @property
    def held(self) -> int:
        return len(self.bases | self.claimed)

    @property
    def has_room(self) -> bool:
        return self.held < self.capacity


@dataclass(frozen=True)
class Fleet:
    """The live inference workers that report their residency."""

    workers: tuple[WorkerLoad, ...]
    routed_waiting: int  # requests waiting in the lists of all live workers, reporting or not


def served_base(record: ModelRecord) -> str:
    """The base whose engine serves the model: a variant stored as a delta (or an adapter) is served over
    its base; anything else as itself."""
    if record.base_model and (record.delta is not None or record.type == "adapter"):
        return record.base_model
    return record.id


def read_fleet(redis: Redis, worker_ids: list[str]) -> Fleet:
    """One round trip: the residency reports, list lengths and claims of `worker_ids` (the live ones)."""
    if not worker_ids:
        return Fleet((), 0)
    with redis.pipeline(transaction=False) as pipe:
        pipe.mget([resident_key(w) for w in worker_ids])
        pipe.mget([capacity_key(w) for w in worker_ids])
        for worker in worker_ids:
            pipe.llen(worker_queue_key(worker))
            pipe.hgetall(claims_key(worker))
        reply = pipe.execute()
    reports, capacities, lengths, claims = reply[0], reply[1], reply[2::2], reply[3::2]
    fresh = time.time() - CLAIM_S
    workers = []
    for worker, raw, capacity, waiting, claimed in zip(
        worker_ids, reports, capacities, lengths, claims, strict=True
    ):
        if raw is None:  # not (yet) reporting: not routed to (a worker writes its report as it starts)
            continue
        try:
            bases = frozenset(json.loads(raw))
        except (ValueError, TypeError):
            continue
        recent = frozenset(b.decode() for b, at in claimed.items() if float(at) >= fresh) - bases
        workers.append(WorkerLoad(worker, bases, int(waiting), recent, capacity_of(capacity)))
    return Fleet(tuple(workers), sum(int(n) for n in lengths))


def choose(base: str, fleet: Fleet) -> tuple[str | None, How]:
    """(the worker to send a request for `base` to, None for the shared list; why it was chosen)."""
    for how, has in (("affinity", lambda w: base in w.bases), ("assigned", lambda w: base in w.claimed)):
        candidates = [w for w in fleet.workers if has(w)]
        if candidates:
            best = min(candidates, key=lambda w: (w.waiting, w.id))
            roomy = [w for w in fleet.workers if w.has_room and base not in w.bases | w.claimed]
            if best.waiting >= SPILL_WAITING and roomy:
                return min(roomy, key=lambda w: (w.held, w.waiting, w.id)).id, "spilled"
            return best.id, how  # type: ignore[return-value]
    if not fleet.workers:
        return None, "shared"
    return min(fleet.workers, key=lambda w: (not w.has_room, w.held, w.waiting, w.id)).id, "new"


# Rule 3 of `choose`, run by Redis on the claims as they are now, and the claim written in the same step.
# KEYS: the claims hashes of the reporting workers; ARGV: base, now, oldest fresh claim, TTL of a claims
# hash, then per worker a JSON [id, reported bases, waiting, capacity]. Returns [worker id, how].
CLAIM_NEW = """
local base, now, fresh = ARGV[1], ARGV[2], tonumber(ARGV[3])
local best, best_key
for i, key in ipairs(KEYS) do
  local w = cjson.decode(ARGV[4 + i])
  local held, n = {}, 0
  for _, b in ipairs(w[2]) do held[b] = true; n = n + 1 end
  local claims = redis.call('HGETALL', key)
  for j = 1, #claims, 2 do
    if tonumber(claims[j + 1]) >= fresh and not held[claims[j]] then
      if claims[j] == base then  -- claimed by a request routed meanwhile: follow it
        redis.call('HSET', key, base, now)
        return {w[1], 'assigned'}
      end
      n = n + 1
    end
  end
  local full = 0
  if n >= w[4] then full = 1 end
  local rank = {full, n, w[3], w[1]}
  local better = best == nil
  if not better then
    for r = 1, 4 do
      if rank[r] ~= best[r] then better = rank[r] < best[r]; break end
    end
  end
  if better then best, best_key = rank, key end
end
redis.call('HSET', best_key, base, now)
redis.call('EXPIRE', best_key, ARGV[4])
return {best[4], 'new'}
"""


def claim_new(redis: Redis, fleet: Fleet, base: str) -> tuple[str, How]:
    """(the worker that takes `base`, "new"; or the one a concurrent request claimed it for, "assigned")."""
    now = time.time()
    workers = [json.dumps([w.id, sorted(w.bases), w.waiting, w.capacity]) for w in fleet.workers]
    keys = [claims_key(w.id) for w in fleet.workers]
    worker, how = redis.eval(
        CLAIM_NEW, len(keys), *keys, base, now, now - CLAIM_S, int(CLAIM_S) * 2, *workers
    )
    return worker.decode(), how.decode()  # type: ignore[return-value]


def enqueue(redis: Redis, fleet: Fleet, base: str, payload: str) -> tuple[str, How]:
    """Push a request for `base` (its JSON) to the list `choose` picks; (that list's key, why)."""
    worker, how = choose(base, fleet)
    if how == "new":
        worker, how = claim_new(redis, fleet, base)
    queue = QUEUE_KEY if worker is None else worker_queue_key(worker)
    with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(queue, payload)
        if worker is not None:  # what a killed worker leaves goes away on its own
            pipe.expire(queue, EVENTS_TTL_S)
        if how in ("assigned", "spilled"):
            pipe.hset(claims_key(worker), base, time.time())
            pipe.expire(claims_key(worker), int(CLAIM_S) * 2)
        pipe.execute()
    return queue, how


def queued_worker(queue: str) -> str | None:
    """The worker whose list `queue` is, None for the shared list."""
    prefix = worker_queue_key("")
    return queue[len(prefix) :] if queue.startswith(prefix) else None
