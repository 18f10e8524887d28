"""`klein-style submit`: run a command as a Ray job on a cluster, through the dashboard's job server.

    klein-style submit --address http://HEAD:8265 --working-dir . -- python -m evaluation.sweep sweep.yaml

is `ray job submit --address http://HEAD:8265 --working-dir . -- python -m evaluation.sweep sweep.yaml` with
the platform's defaults: it waits for the job and streams its logs, prints the job's id and final status,
and exits with a code that reflects that status (0 SUCCEEDED, the driver's exit code or 1 for FAILED,
3 STOPPED, 124 when `--timeout` ran out and the job was stopped, 2 when the job could not be submitted).
Ctrl-C stops waiting, not the job (stop it with `ray job stop ID`), unless `--stop-on-interrupt`.

The job's entrypoint runs on the head with RAY_ADDRESS set to that cluster, so `ray.init()` (and
`evaluation.sweep`) join the cluster the job runs in. Clusters with Ray's token authentication (the default
for a `ray start` head when `~/.ray/auth_token` exists) get the token from `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, as the `ray` CLI does with RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from ray.job_submission import JobSubmissionClient

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
EXIT_SUBMIT_ERROR = 2
EXIT_STOPPED = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class SubmitError(RuntimeError):
    """The job could not be submitted (no job server at the address, bad runtime_env, ...)."""


@dataclass
class JobResult:
    submission_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""
    driver_exit_code: int | None = None
    address: str = ""
    timed_out: bool = False
    logs: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The process exit code that reflects the job's status."""
        return exit_code_for(self.status, self.driver_exit_code, self.timed_out)


def exit_code_for(status: str, driver_exit_code: int | None = None, timed_out: bool = False) -> int:
    if timed_out:
        return EXIT_TIMEOUT
    status = str(status)
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED":
        return driver_exit_code if isinstance(driver_exit_code, int) and 0 < driver_exit_code < 256 else 1
    if status == "STOPPED":
        return EXIT_STOPPED
    return 0  # PENDING/RUNNING: submitted without waiting


def resolve_address(address: str | None = None) -> str:
    """The job server's URL: `address`, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else localhost:8265."""
    if address:
        return address if "://" in address else f"http://{address}"
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return resolve_address(os.environ["RAY_API_SERVER_ADDRESS"])
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):  # a GCS address (host:port) is not a job server
        return ray_address
    return DEFAULT_DASHBOARD


def _enable_token_auth_if_available() -> None:
    """Send Ray's auth token when one exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).

    Ray 2.60's job SDK only attaches the token in token mode; like `ray start`, switch that mode on when a
    token is there and the user did not choose a mode. Older Rays have no token auth: nothing to do.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def client(address: str | None = None):
    """A `JobSubmissionClient` for the cluster at `address` (see `resolve_address`)."""
    url = resolve_address(address)
    _enable_token_auth_if_available()
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, AuthenticationError, version mismatch
        raise SubmitError(f"no Ray job server at {url}: {e}") from e


def entrypoint_string(command: list[str] | str) -> str:
    """The shell command the job runs: a list is quoted word by word; a single string is taken as written."""
    if isinstance(command, str):
        return command
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SubmitError("no entrypoint: put the command after `--`, e.g. `-- python -m evaluation.sweep sweep.yaml`")
    return command[0] if len(command) == 1 else shlex.join(command)


def build_runtime_env(working_dir: str | None = None, runtime_env: dict | None = None,
                      env_vars: dict[str, str] | None = None) -> dict | None:
    """Merge a runtime_env mapping, the working dir (uploaded; .gitignore'd files stay behind) and env vars."""
    env: dict[str, Any] = dict(runtime_env or {})
    if working_dir:
        path = Path(working_dir).expanduser()
        if "://" not in working_dir and not path.is_dir():
            raise SubmitError(f"--working-dir {working_dir}: not a folder")
        env["working_dir"] = str(path.resolve()) if "://" not in working_dir else working_dir
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    return env or None


def load_runtime_env(path: str | None = None, text: str | None = None) -> dict:
    """A runtime_env from a YAML/JSON file and/or a JSON string (the string's keys win)."""
    env: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SubmitError(f"--runtime-env {path}: {e}") from e
        if not isinstance(data, dict):
            raise SubmitError(f"--runtime-env {path}: must hold a mapping (working_dir, pip, env_vars, ...)")
        env.update(data)
    if text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SubmitError(f"--runtime-env-json: not JSON: {e}") from e
        if not isinstance(data, dict):
            raise SubmitError("--runtime-env-json must be a JSON object")
        env.update(data)
    return env


def submit(command: list[str] | str, *, address: str | None = None, working_dir: str | None = None,
           runtime_env: dict | None = None, env_vars: dict[str, str] | None = None, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, metadata: dict[str, str] | None = None) -> tuple[Any, str]:
    """Submit the job; returns (client, submission id)."""
    jobs = client(address)
    kwargs: dict[str, Any] = {"entrypoint": entrypoint_string(command),
                              "runtime_env": build_runtime_env(working_dir, runtime_env, env_vars)}
    if submission_id:
        kwargs["submission_id"] = submission_id
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    if metadata:
        kwargs["metadata"] = metadata
    try:
        return jobs, jobs.submit_job(**kwargs)
    except Exception as e:
        raise SubmitError(f"the job server at {resolve_address(address)} refused the job: {e}") from e


def wait(jobs, submission_id: str, *, stream: Callable[[str], None] | None = print, timeout_s: float | None = None,
         poll_s: float = 1.0, address: str = "") -> JobResult:
    """Stream the job's logs (if `stream`) until it ends or `timeout_s` passes; stop it on time-out."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    logs: list[str] = []

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission_id):
            logs.append(chunk)
            if stream is not None:
                stream(chunk)

    timed_out = False
    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=None if deadline is None else max(1.0, deadline - time.monotonic())))
    except asyncio.TimeoutError:
        timed_out = True
    except Exception as e:  # the log stream broke (server restarted?): fall back to polling the status
        if stream is not None:
            stream(f"[klein-style submit] log stream ended early ({e}); polling the job's status\n")
    info = jobs.get_job_info(submission_id)
    while not timed_out and not _terminal(info.status):
        if deadline is not None and time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(poll_s)
        info = jobs.get_job_info(submission_id)
    if timed_out and not _terminal(info.status):
        jobs.stop_job(submission_id)
        info = _wait_terminal(jobs, submission_id, 60.0, poll_s)
    return JobResult(submission_id, str(info.status), info.message or "", getattr(info, "driver_exit_code", None),
                     address, timed_out, logs)


def _terminal(status) -> bool:
    return str(status) in ("SUCCEEDED", "FAILED", "STOPPED")


def _wait_terminal(jobs, submission_id: str, timeout_s: float, poll_s: float):
    deadline = time.monotonic() + timeout_s
    info = jobs.get_job_info(submission_id)
    while not _terminal(info.status) and time.monotonic() < deadline:
        time.sleep(poll_s)
        info = jobs.get_job_info(submission_id)
    return info


def run_job(command: list[str] | str, *, address: str | None = None, wait_for_end: bool = True,
            stream: Callable[[str], None] | None = print, timeout_s: float | None = None, **submit_kwargs) -> JobResult:
    """Submit `command` as a Ray job and (by default) wait for it, streaming its logs."""
    jobs, submission_id = submit(command, address=address, **submit_kwargs)
    url = resolve_address(address)
    if not wait_for_end:
        return JobResult(submission_id, str(jobs.get_job_status(submission_id)), address=url)
    return wait(jobs, submission_id, stream=stream, timeout_s=timeout_s, address=url)


# -- command line --------------------------------------------------------------------------------------------
def _parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    return env


def register(sub) -> None:
    p = sub.add_parser(
        "submit", help="run a command as a Ray job on a cluster (ray job submit), wait and stream its logs",
        description="Submit `-- COMMAND ...` to the Ray job server at --address, stream its logs, and exit with "
                    "the job's status (0 SUCCEEDED, driver exit code or 1 FAILED, 3 STOPPED, 124 time-out).",
    )
    p.add_argument("--address", default=None, help="the dashboard's job server, e.g. http://HEAD:8265 (default: "
                   "RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=None, help="folder uploaded as the job's working directory (e.g. `.`)")
    p.add_argument("--runtime-env", default=None, help="runtime_env YAML/JSON file (pip, env_vars, ...)")
    p.add_argument("--runtime-env-json", default=None, help="runtime_env as a JSON string (wins over the file)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the job; repeatable")
    p.add_argument("--submission-id", default=None, help="the job's id (default: Ray picks one)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the entrypoint")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--timeout", type=float, default=None, help="stop the job if it has not ended after this many seconds")
    p.add_argument("--stop-on-interrupt", action="store_true", help="Ctrl-C stops the job too")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- the command to run, e.g. -- python -m evaluation.sweep sweep.yaml")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        runtime_env = load_runtime_env(args.runtime_env, args.runtime_env_json)
        jobs, submission_id = submit(
            args.entrypoint, address=args.address, working_dir=args.working_dir, runtime_env=runtime_env,
            env_vars=_parse_env(args.env), submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
        )
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SUBMIT_ERROR
    url = resolve_address(args.address)
    print(f"job {submission_id} submitted to {url}", flush=True)
    if args.no_wait:
        print(f"job {submission_id}: {jobs.get_job_status(submission_id)}")
        print(f"  logs: ray job logs --address {url} --follow {submission_id}")
        return 0
    try:
        result = wait(jobs, submission_id, stream=lambda chunk: print(chunk, end="", flush=True),
                      timeout_s=args.timeout, address=url)
    except KeyboardInterrupt:
        if args.stop_on_interrupt:
            jobs.stop_job(submission_id)
            print(f"\njob {submission_id}: stop requested", file=sys.stderr)
        else:
            print(f"\njob {submission_id} keeps running; stop it with `ray job stop --address {url} {submission_id}`",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    print(status_line(result, args.timeout), flush=True)
    return result.exit_code


def status_line(result: JobResult, timeout_s: float | None = None) -> str:
    """`job ID: STATUS`, with why for a job that did not succeed (first line of Ray's message, exit code)."""
    line = f"job {result.submission_id}: {result.status}"
    if result.timed_out:
        line += f" (stopped after --timeout {timeout_s:g} s)" if timeout_s is not None else " (timed out)"
    if result.status != "SUCCEEDED" and result.message:
        line += f" - {result.message.strip().splitlines()[0]}"
    return line
