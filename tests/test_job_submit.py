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


def test_extract_under_ray_job_submit_to_an_s3_store(ray_head, tmp_path, s3_bucket):
    write_ava(tmp_path / "ava", good_images(4))
    store = f"s3://{s3_bucket}/features"
    runtime_env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    result = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "ray_jobs.extract", f"dataset.path={tmp_path / 'ava'}", f"store={store}",
         "backbones=[resnet18]", "weights=random:0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
    out = json.loads(line)
    assert out["rows"] == out["ok"] == 4
    reader = FeatureStore(store).open(out["entry"])
    assert reader.manifest["ok"] == 4 and reader.read_range(0, 4)["gsf"].any()
    assert "testing" not in json.dumps(reader.spec.to_json()) + json.dumps(reader.attrs)  # no credentials stored
