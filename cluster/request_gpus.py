"""Ask an autoscaling Ray cluster for GPU workers and wait until they have joined.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python cluster/request_gpus.py 8
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python cluster/request_gpus.py 0

Why: the jobs choose CPU or GPU from the GPUs the cluster has when they start. The extract and
train jobs use GPUs only if some are there (device=auto), and device=cuda fails if there are none
yet. The distill job fits on the driver when the cluster has no GPU. On a cluster whose GPU workers
scale from 0 (cluster/aws.yaml), ask for the GPUs first, then submit the job.

``N > 0`` asks the autoscaler for N one-GPU bundles (``ray.autoscaler.sdk.request_resources``)
and waits until the cluster has at least N GPUs, or fails after ``--timeout`` seconds. ``0``
withdraws the request, so idle GPU nodes go away after ``idle_timeout_minutes``. The request
outlives this job, but Ray Data and Ray Train send requests of their own while they run, and
those replace it. So run it right before each job that needs its GPUs from the start. The last
stdout line is JSON: requested, gpus, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable


def hold_gpus(n: int, timeout_s: float, request: Callable[[list[dict]], None], cluster_gpus: Callable[[], float],
              sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
              poll_s: float = 10.0, log: Callable[[str], None] = lambda m: None) -> dict:
    """Request ``n`` one-GPU bundles (``n == 0`` withdraws any request), then wait for ``n`` GPUs.
    Raises TimeoutError if they have not joined after ``timeout_s`` seconds."""
    if n < 0:
        raise ValueError(f"the number of GPUs must be >= 0, got {n}")
    start = clock()
    request([{"GPU": 1} for _ in range(n)])
    while True:
        gpus = cluster_gpus()
        if gpus >= n:
            return {"requested": n, "gpus": gpus, "seconds": round(clock() - start, 1)}
        waited = clock() - start
        if waited >= timeout_s:
            raise TimeoutError(f"the cluster has {gpus:g} of {n} GPUs after {waited:.0f} s: check `ray status` "
                               "(spot capacity, max_workers of the GPU node types, instance quotas)")
        log(f"[request_gpus] {gpus:g}/{n} GPUs, waiting ({waited:.0f} s)")
        sleep(min(poll_s, max(timeout_s - waited, 0.0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/request_gpus.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpus", type=int, help="GPUs to hold (one-GPU bundles); 0 withdraws the request")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the GPUs (default 1800)")
    args = parser.parse_args(argv)
    if args.gpus < 0:
        parser.error("gpus must be >= 0")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init()  # the cluster of `ray job submit` (RAY_ADDRESS)
    result = hold_gpus(args.gpus, args.timeout,
                       request=lambda bundles: request_resources(bundles=bundles),
                       cluster_gpus=lambda: ray.cluster_resources().get("GPU", 0.0),
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
