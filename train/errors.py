"""The training package's errors that other packages catch, and the job-id check that raises one.

Free of torch and of our heavier modules: the config modules (recipe.py and aitoolkit.py import ConfigError; neither
imports the other's error, so there is no import cycle) and the HTTP tier (serve.routers, serve.jobs: the Ingress
replica imports no torch) import them from here.
"""

from contracts import JOB_ID_RULE, is_job_id


class ConfigError(ValueError):
    """A bad training configuration; the message names the key and the allowed values."""


class JobError(RuntimeError):
    """The job could not run or finish; the message says at which stage and why."""


def check_job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise JobError(f"invalid job id {job_id!r}: use {JOB_ID_RULE}")
    return job_id
