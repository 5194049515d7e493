"""`ray job submit` of a real job against a Ray head the fixture starts (Ray 2.60 token auth off)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from image_data import good_images, write_ava

from featurestore.store import FeatureStore
from featurestore.views import GsfView
from ray_jobs.runtime import FORWARDED_ENV

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_endpoint, tmp_path_factory):
    """A head node whose environment has no AWS settings: jobs must bring them in runtime_env."""
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k not in FORWARDED_ENV}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv, as if activated
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=4", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, env=env, capture_output=True, timeout=180)
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def submit(head: str, *entrypoint: str) -> dict:
    """``ray job submit`` (blocking) of one job; its result is the last JSON line it printed."""
    runtime_env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    result = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", *entrypoint],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))


def test_extract_distill_train_under_ray_job_submit_to_s3(ray_head, tmp_path, s3_bucket):
    """The three stages as a user runs them on a cluster: each a submitted job, all through S3."""
    write_ava(tmp_path / "ava", good_images(8), test_every=4)
    store = f"s3://{s3_bucket}/features"
    gsf = submit(ray_head, "ray_jobs.extract", f"dataset.path={tmp_path / 'ava'}", f"store={store}",
                 "backbones=[resnet18]", "weights=random:0")
    assert gsf["rows"] == gsf["ok"] == 8
    view = GsfView(FeatureStore(store), gsf["entry"])
    assert view.entry.manifest["ok"] == 8 and view.features(view.dataset().sha256).any()
    segment = FeatureStore(store).open(gsf["segment"])
    for reader in (view.entry, segment):  # no credentials stored
        assert "testing" not in json.dumps(reader.spec.to_json()) + json.dumps(reader.attrs)

    knowledge = submit(ray_head, "ray_jobs.distill", f"store={store}", f"gsf_entry={gsf['entry']}",
                       "hidden=[32,16]", "epochs=2", "batch_size=4")
    assert knowledge["gsf_entry"] == gsf["entry"] and knowledge["train_rows"] == 6 and knowledge["test_rows"] == 2

    student = submit(ray_head, "ray_jobs.train_student", f"store={store}", f"knowledge_entry={knowledge['entry']}",
                     "student.backbone=resnet18", "student.view=resize:64", "num_workers=[1,2]", "epochs=1",
                     "global_batch_size=2", f"storage_path=s3://{s3_bucket}/runs", "name=submitted")
    assert student["checkpoint"].startswith(f"s3://{s3_bucket}/runs/submitted") and student["epochs"] == 1
    assert student["train_rows"] == 6
