"""What a job prints on stderr: its own lines, not Ray's, unless --verbose; worker errors always.

Each test runs a small real job (``run_job`` + ``init_ray`` + Ray tasks on a local instance) in a
subprocess and reads its stderr, as a user's console would show it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOB = textwrap.dedent('''
    import dataclasses
    import sys
    import time

    from featurestore.datasets import DatasetError
    from ray_jobs.config import option, run_job
    from ray_jobs.runtime import Progress, init_ray, log

    JOB = "console_check"


    @dataclasses.dataclass(frozen=True)
    class Config:
        tasks: int = option(3, help="Ray tasks to run")
        fail: str = option("", help="'' | user | bug: what the last task raises")


    def work(i, fail):
        print(f"chatter from worker task {i}", file=sys.stderr, flush=True)  # shown only when verbose
        log(JOB, f"task {i} ran in a worker")  # one of our lines, printed by a worker: always shown
        if fail == "user":
            raise DatasetError(f"task {i}: AVA.txt line 7 has 9 vote counts, expected 10; fix the file")
        if fail == "bug":
            raise RuntimeError(f"task {i}: an internal bug")
        return i


    def main(cfg):
        ray = init_ray(num_cpus=2)
        remote = ray.remote(num_cpus=0.5)(work)
        progress = Progress(JOB, cfg.tasks, unit="tasks", every=0)
        refs = [remote.remote(i, cfg.fail if i == cfg.tasks - 1 else "") for i in range(cfg.tasks)]
        for ref in refs:
            ray.get(ref)
            progress.add(1)
        time.sleep(3)  # Ray forwards workers' output asynchronously: let it arrive before the driver exits
        return {"done": progress.done}


    if __name__ == "__main__":
        sys.exit(run_job(JOB, Config, main))
''')

RAY_INTERNAL = ("Started a local Ray instance", "pid=")  # Ray's driver INFO line; forwarded worker output


def run(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "console_job.py"
    script.write_text(JOB)
    environ = {k: v for k, v in os.environ.items() if k != "AKD_VERBOSE"}
    environ.update({"RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")]),
                    **(env or {})})
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          env=environ, timeout=300)


def test_quiet_by_default_our_progress_stays(tmp_path):
    proc = run(tmp_path, "tasks=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert "[console_check] 3/3 tasks" in proc.stderr  # our progress line, with rate and ETA
    assert "[console_check] task 2 ran in a worker" in proc.stderr  # ours, forwarded from a worker
    assert all(line.startswith("[console_check] ") for line in lines), lines  # nothing but ours
    assert proc.stdout.strip().splitlines()[-1] == '{"done": 3}'


def test_verbose_brings_rays_logs_back(tmp_path):  # AKD_VERBOSE=1 does the same (tests/test_config.py)
    proc = run(tmp_path, "--verbose", "tasks=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for marker in RAY_INTERNAL:
        assert marker in proc.stderr, proc.stderr[-3000:]
    assert "chatter from worker task" in proc.stderr and "[console_check] 3/3 tasks" in proc.stderr  # Ray dedups the rest
    assert proc.stdout.strip().splitlines()[-1] == '{"done": 3}'  # --verbose is no config key


def test_a_user_error_in_a_worker_is_one_error_line(tmp_path):
    proc = run(tmp_path, "tasks=2", "fail=user")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()  # lines forwarded from workers may come after the driver's
    assert [line for line in lines if not line.startswith("[console_check] ")] == \
        ["error: task 1: AVA.txt line 7 has 9 vote counts, expected 10; fix the file"]


def test_a_bug_in_a_worker_keeps_its_traceback(tmp_path):
    proc = run(tmp_path, "tasks=2", "fail=bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: task 1: an internal bug" in proc.stderr
    assert "in work" in proc.stderr  # the worker's own frame, not only the driver's
