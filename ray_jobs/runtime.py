"""What every job needs from its environment: a Ray connection and a progress line on stderr.

The console shows the job's own lines — ``[job] ...`` progress with rate and ETA, warnings,
the result — and, on failure, one ``error:`` line or the traceback. Ray's internal logs are
off by default: what Ray's worker processes print (Ray Train's controller and workers, Ray
Data's actors, their C++ core, tracebacks of Ray's own threads), Ray's and Ray Data's INFO
lines and a few notices on the driver. They are still written to Ray's session log directory
(``/tmp/ray/session_latest/logs`` on a local instance). ``--verbose`` on any job, or
``AKD_VERBOSE=1``, brings them back to the console.

What stays: our ``[job]`` lines and our warnings also when a worker prints them (a stage that
runs in a Ray task on a GPU node), Ray's warnings and errors on the driver, the cluster's
scheduling warnings, the messages the cluster pushes to the driver (a worker died), and ERROR
lines of the driver's own C++ core, which Ray always writes to stderr. Exceptions raised in
workers (a Ray task, a Ray Data actor, a Ray Train worker) do not travel as log lines: they come
back to the driver as exceptions, and the job reports them either way.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

# Ray Data's own progress bars and the AWS chain's credential messages would drown ours.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

#: ``1`` (or ``true``/``yes``/``on``): show Ray's internal logs on the console. ``--verbose`` sets it.
VERBOSE_ENV = "AKD_VERBOSE"

#: Driver loggers whose warnings are notices, not problems, for our jobs; silenced unless verbose:
#: the token-authentication mode of a local instance (printed at every start), and that Ray
#: Data's progress bars are off (we turn them off: ``Progress`` prints ours).
_QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")

#: Variables that workers of a pre-started cluster need from the driver (DESIGN §5): they do not
#: inherit its environment. A driver that connects to a cluster by ``ray_address`` forwards these
#: through ``runtime_env``; under ``ray job submit`` pass them with ``--runtime-env-json`` (the
#: job's runtime env then covers every worker). Values go to Ray only, never into the store,
#: logs or results.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AKD_CACHE_DIR", "AKD_S3_MAX_RETRIES", "AKD_S3_RETRY_TIMEOUT_S", "AKD_VERIFY_CHECKSUMS",
                 "HF_HUB_OFFLINE")


def verbose() -> bool:
    """True when Ray's internal logs should reach the console (``AKD_VERBOSE`` or ``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Turn Ray's console logs on or off for this process and the local workers it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


#: A line of ours in a worker's output: ``log()``'s ``[job] message``, or a Python warning raised
#: in our packages (``.../trainers/weights.py:290: UserWarning: ...``).
_OUR_LINE = re.compile(r"\[[a-z][a-z0-9_]*\] |.*[/\\](?:featurestore|trainers|ray_jobs)[/\\][^:]*:\d+: \w*Warning: ")


def ray_init_options() -> dict:
    """The ``ray.init`` logging options: Ray's defaults when verbose, else quiet.

    Quiet: ``logging_level=WARNING`` keeps the driver's ``ray`` logger to warnings and errors
    (no "Started a local Ray instance", no Ray Train tips). The workers' output is still
    forwarded (``log_to_driver``), and :func:`forward_only_our_lines` then filters it.
    """
    if verbose():
        return {}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return {"logging_level": logging.WARNING}


def forward_only_our_lines() -> bool:
    """Of what Ray forwards from the workers to this console, print only our lines and the
    cluster's scheduling warnings (the autoscaler's ``Warning:``/``Error:`` events, e.g. a
    request no node can satisfy). Everything else — Ray Train's controller and worker INFO lines,
    C++ core warnings, tracebacks of Ray's own threads — stays in the session's log files.

    Ray has no public filter for forwarded output: this replaces the driver's printing handler
    (``ray_print_logs`` on ``ray._private.ray_logging``'s dispatcher, Ray 2.60). Where that is
    not found, Ray's own printing is left as it is (everything shown, nothing of ours lost) and
    this returns False.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", ())):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _print_our_lines)  # same name: ray.shutdown() removes it
    return True


def _print_our_lines(data: dict) -> None:
    autoscaler = data.get("pid") == "autoscaler"
    lines = [line for line in data.get("lines") or () if (_OUR_LINE.match(line) if not autoscaler else
                                                           "Warning:" in line or "Error:" in line)]
    if lines:  # all to stderr: a job's stdout carries only its result line, which a late worker line must not follow
        print("\n".join(lines), file=sys.stderr, flush=True)


def quiet_ray_data() -> None:
    """Ray Data's console handler at WARNING unless verbose: its INFO lines (execution plans,
    "dataset execution finished") leave the console; warnings (e.g. a stalled pipeline) stay,
    and its log file in the session directory keeps every level."""
    if verbose():
        return
    import ray.data  # noqa: F401 - configures the ``ray.data`` logger on first import

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):  # console
            handler.setLevel(max(handler.level, logging.WARNING))


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster (``address``, or ``RAY_ADDRESS`` as set by ``ray job submit``), or
    start a local instance. Locally Ray gets at least 4 logical CPUs: Ray Data's resource budget
    excludes actors' CPUs, and on a 2-core machine it would otherwise stall (ray issue #41603).
    Ray's internal logs stay off the console unless :func:`verbose` (see the module doc)."""
    import ray

    if ray.is_initialized():
        return ray
    options = ray_init_options()
    if address:  # a driver outside the cluster: bring the S3 settings along
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **options)
    elif not is_local(None):  # inside `ray job submit`: the job's runtime env applies
        ray.init(**options)
    else:  # local instance: workers inherit this process's environment
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, **options)
    if not verbose():
        forward_only_our_lines()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data()
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
