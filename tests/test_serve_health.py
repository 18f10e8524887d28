"""/healthz: 503 (JSON, Retry-After) while the Generator is starting, 200 once a Generator replica runs."""

from __future__ import annotations

import json

from ray.serve.schema import (
    ApplicationStatus, ApplicationStatusOverview, DeploymentStatus, DeploymentStatusOverview, DeploymentStatusTrigger,
    ServeStatus,
)

from serve.routers.service import generator_readiness, health_response

APP = "klein-style"


def serve_status(generator_replicas: dict[str, int], app: str = APP) -> ServeStatus:
    """Serve's own status objects, as `serve.status()` returns them while the app deploys."""
    starting = not generator_replicas.get("RUNNING")
    deployments = {
        "Ingress": DeploymentStatusOverview(DeploymentStatus.HEALTHY, DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
                                            {"RUNNING": 1}, ""),
        "Generator": DeploymentStatusOverview(DeploymentStatus.UPDATING if starting else DeploymentStatus.HEALTHY,
                                              DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, generator_replicas, ""),
    }
    overview = ApplicationStatusOverview(ApplicationStatus.DEPLOYING if starting else ApplicationStatus.RUNNING, "",
                                         0.0, deployments)
    return ServeStatus(applications={app: overview})


def test_healthz_is_503_while_the_generator_starts_and_200_once_a_replica_runs():
    ready, why = generator_readiness(serve_status({"STARTING": 1}), APP)
    assert ready is False and "0 of 1 replica(s) running" in why
    starting = health_response(ready, why, "tiny", "r1")
    assert starting.status_code == 503 and starting.headers["retry-after"] == "5"
    body = json.loads(starting.body)
    assert body["error"] == "unavailable" and body["state"] == "starting" and "Generator is starting" in body["detail"]
    # one running replica is enough to draw (a second one still starting does not make the service unready)
    ready, why = generator_readiness(serve_status({"RUNNING": 1, "STARTING": 1}), APP)
    running = health_response(ready, why, "tiny", "r1")
    assert ready is True and running.status_code == 200
    assert json.loads(running.body) == {"status": "ok", "model": "tiny", "replica": "r1", "generator": "ready",
                                        "detail": "1 Generator replica(s) running"}
    # another app's Generator says nothing about ours: unknown is not a 503 (Serve keeps serving without its controller)
    ready, why = generator_readiness(serve_status({"RUNNING": 1}, app="other"), APP)
    assert ready is None and health_response(ready, why, "tiny", "r1").status_code == 200
