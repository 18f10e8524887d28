"""What the routers share: calls into other deployments (retries, deadlines, 503s), ownership checks, the
trigger check and uploaded-file names."""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from serve import jobs as jobstore
from serve.errors import ApiError, not_found
from serve.middleware import RUNTIME, ctx
from serve.tenants import retry_after_header
from train.captions import check_trigger
from train.errors import JobError, check_job_id

try:  # newer Serve only
    from ray.serve.exceptions import ReplicaUnavailableError
except ImportError:  # pragma: no cover
    ReplicaUnavailableError = DeploymentUnavailableError

log = logging.getLogger("klein.serve.ingress")

OVERLOAD_RETRY_S = 2
_REPLICA_FAILURES = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


def check_id(lora_id: str, field: str = "id") -> str:
    try:
        return check_job_id(lora_id)
    except JobError:
        # an id that cannot exist is simply not found (and is never used as a path)
        raise not_found("LoRA", field) from None


def owned(tenant: str, lora_id: str, field: str = "id") -> str:
    """The id, if it names a LoRA of `tenant`; else the same 404 as for an id that does not exist."""
    lora_id = check_id(lora_id, field)
    if not jobstore.owns(ctx().storage, tenant, lora_id):
        raise not_found("LoRA", field)
    return lora_id


def checked_trigger(value) -> str:
    try:
        return check_trigger(value)
    except Exception as e:  # noqa: BLE001 — the check's message is written for users
        raise ApiError(422, str(e), "trigger") from None


def upload_label(filename: str | None) -> str:
    """How errors name an uploaded file: its base name as the client sent it (printable, short)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:100]
    return name or "the uploaded zip"


def is_replica_failure(error: BaseException) -> bool:
    """A downstream replica died or is gone (not: the request itself was bad)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _REPLICA_FAILURES):
            return True
        if isinstance(error, RayServeException) and "actor died" in str(error):
            return True
        error = getattr(error, "cause", None) if isinstance(error, RayTaskError) else error.__cause__
    return False


async def call(make, what: str = "service", timeout_s: float | None = None, retry_after_s: int = OVERLOAD_RETRY_S,
               attempts: int = 2):
    """Call a deployment: `make()` sends the request and returns its DeploymentResponse.

    Every call the ingress makes is idempotent (a seeded image, a prompt rewrite, a fusion), so a call whose
    replica died under it is sent once more, to a live or a replacement replica, while the deadline allows.
    Back-pressure, a replica failure that persists and the deadline become 503 + Retry-After; a call past the
    deadline is cancelled so that it does not hold a slot downstream."""

    async def wait(response):
        return await response

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retry = retry_after_header(retry_after_s)
    for attempt in range(attempts):
        response = make()
        remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(wait(response), remaining)
        except BackPressureError as e:
            raise ApiError(503, f"the {what} is at capacity; retry shortly", None, error="overloaded",
                           headers=retry_after_header(e.retry_after_s or retry_after_s)) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(503, f"the {what} did not answer within {timeout_s:g} s; retry shortly", None,
                           error="timeout", headers=retry) from None
        except Exception as e:
            if not is_replica_failure(e):
                raise
            if attempt + 1 < attempts and (deadline is None or deadline - time.monotonic() > 1.0):
                log.warning("a %s replica failed under a request (%s); sending it again", what, type(e).__name__)
                continue
            log.warning("the %s failed while handling a request (%s); answering 503", what, type(e).__name__)
            raise ApiError(503, f"the {what} is restarting; retry shortly", None, error="unavailable",
                           headers=retry) from None


async def downstream(make, what: str, timeout_s: float | None = None):
    """`make()` sends one call to a deployment; see `call` for retries, time-outs and 503s."""
    config = RUNTIME["config"]
    timeout_s = config.downstream_timeout_s if timeout_s is None else timeout_s
    return await call(make, what, timeout_s, config.overload_retry_after_s)
