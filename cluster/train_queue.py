"""The training pool's FIFO queue: a small detached actor, in a module of its own.

Ray imports an actor's class from its module in the actor's worker process: defined in `cluster.pools` (which
imports torch and Ray Train for the job-side helpers) the queue cost every cluster ~2.7 CPU-s of imports it never
uses. Here it needs only asyncio and Ray's core. `cluster.pools` creates it (`train_queue`) and re-exports it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

TRAIN_QUEUE_ACTOR_NAME = "klein-train-queue"
TRAIN_QUEUE_NAMESPACE = "klein-style"


class PoolError(RuntimeError):
    """A pool option is invalid, or the pool cannot give what was asked; the message says why."""


class TrainPoolFullError(PoolError):
    """The training pool could not hold a job's reservation in the time allowed."""


@dataclass
class _Waiting:
    job_id: str
    last_seen: float


@ray.remote(num_cpus=0, max_restarts=-1)
class TrainQueue:
    """First come, first served admission to the training pool.

    Only the job at the head of the queue creates its placement group; when its workers run it
    calls `started` and the next job may go. Jobs that stop sending heartbeats (a driver that died)
    are dropped after `lease_s`, so a dead driver cannot block the pool.
    """

    def __init__(self, lease_s: float = 120.0):
        self._lease_s = lease_s
        self._waiting: list[_Waiting] = []
        self._started: list[str] = []
        self._changed = asyncio.Event()

    def _expire(self) -> None:
        now = time.monotonic()
        alive = [w for w in self._waiting if now - w.last_seen <= self._lease_s]
        if len(alive) != len(self._waiting):
            dropped = {w.job_id for w in self._waiting} - {w.job_id for w in alive}
            logger.warning("train queue: dropping jobs whose drivers went silent: %s", sorted(dropped))
            self._waiting = alive
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _find(self, job_id: str) -> _Waiting | None:
        return next((w for w in self._waiting if w.job_id == job_id), None)

    async def join(self, job_id: str) -> int:
        """Queue `job_id` (no-op if already queued); returns its 0-based position."""
        self._expire()
        entry = self._find(job_id)
        if entry is None:
            self._waiting.append(_Waiting(job_id, time.monotonic()))
        else:
            entry.last_seen = time.monotonic()
        return [w.job_id for w in self._waiting].index(job_id)

    async def heartbeat(self, job_id: str) -> bool:
        """Keep `job_id`'s place; False if it is no longer queued."""
        entry = self._find(job_id)
        if entry is not None:
            entry.last_seen = time.monotonic()
        self._expire()
        return entry is not None

    async def wait_turn(self, job_id: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until `job_id` heads the queue; True when it does."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.heartbeat(job_id)
            if self._find(job_id) is None:
                raise PoolError(f"job {job_id!r} is not in the training queue (it left or its lease expired)")
            if self._waiting[0].job_id == job_id:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, self._lease_s / 4))
            except asyncio.TimeoutError:
                pass

    async def started(self, job_id: str) -> None:
        """`job_id` holds its resources and runs: let the next job go."""
        if self._find(job_id) is not None:
            self._waiting = [w for w in self._waiting if w.job_id != job_id]
            self._started.append(job_id)
            self._notify()

    async def leave(self, job_id: str) -> None:
        """Remove `job_id` (finished, failed or cancelled before it started)."""
        if self._find(job_id) is not None:
            self._waiting = [w for w in self._waiting if w.job_id != job_id]
            self._notify()

    async def waiting(self) -> list[str]:
        self._expire()
        return [w.job_id for w in self._waiting]

    async def started_order(self) -> list[str]:
        """Job ids in the order they were admitted (for tests and the CLI)."""
        return list(self._started)
