"""What every job needs from its environment: a Ray connection and a progress line on stderr."""

from __future__ import annotations

import os
import sys
import time

# Ray Data's own progress bars and the AWS chain's credential messages would drown ours.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

#: Variables that workers of a pre-started cluster need from the driver (DESIGN §5): they do not
#: inherit its environment. A driver that connects to a cluster by ``ray_address`` forwards these
#: through ``runtime_env``; under ``ray job submit`` pass them with ``--runtime-env-json`` (the
#: job's runtime env then covers every worker). Values go to Ray only, never into the store,
#: logs or results.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AKD_CACHE_DIR", "AKD_S3_MAX_RETRIES", "AKD_S3_RETRY_TIMEOUT_S", "HF_HUB_OFFLINE")


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster (``address``, or ``RAY_ADDRESS`` as set by ``ray job submit``), or
    start a local instance. Locally Ray gets at least 4 logical CPUs: Ray Data's resource budget
    excludes actors' CPUs, and on a 2-core machine it would otherwise stall (ray issue #41603)."""
    import ray

    if ray.is_initialized():
        return ray
    if address:  # a driver outside the cluster: bring the S3 settings along
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
    elif not is_local(None):  # inside `ray job submit`: the job's runtime env applies
        ray.init()
    else:  # local instance: workers inherit this process's environment
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def is_local(address: str | None) -> bool:
    """True when the job will start its own Ray instance on this machine."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def log(job: str, message: str) -> None:
    print(f"[{job}] {message}", file=sys.stderr, flush=True)


class Progress:
    """Rows done, rate and ETA, printed to stderr at most every ``every`` seconds."""

    def __init__(self, job: str, total: int, unit: str = "rows", every: float = 5.0):
        self.job, self.total, self.unit, self.every = job, total, unit, every
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log(self.job, f"{self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, ETA {eta:.0f} s)")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
