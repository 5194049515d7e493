"""A real fault-injecting S3 proxy for tests: mitmdump in reverse mode in front of a loopback S3.

    proxy = FaultProxy("http://127.0.0.1:5000").start()
    proxy.set(slowdown=0.2, internal_error=0.1, seed=7)   # 20 % 503 SlowDown, 10 % 500
    with proxy.env():                                      # AWS_ENDPOINT_URL → the proxy
        ...                                                # boto3 / obstore / FeatureStore clients
    proxy.stats()["slowdown"]                              # faults actually injected
    proxy.stop()

Rules (all optional; :meth:`FaultProxy.set` merges them into the current ones):

* ``slowdown``, ``internal_error``, ``drop`` — probabilities per request of ``503 SlowDown``,
  ``500 InternalError`` and a killed connection (no response);
* ``latency_ms`` — added to every request before it is handled;
* ``outage_keys`` (substrings of the request path) with ``outage_s`` (seconds from now) or
  ``outage_until`` (epoch seconds) — those requests always get 503 until the deadline;
* ``seed`` — the addon's RNG is reseeded with it on every change, so runs are reproducible.

The addon (tests/fault_addon.py) re-reads the rules file when it changes; it writes counters of
what it injected to a stats file: ``requests``, ``passed``, ``delayed``, ``slowdown``,
``internal_error``, ``drop``, ``outage``, and the GETs it passed by path
(:meth:`FaultProxy.gets`). :meth:`clear` drops every rule and zeroes the counters.
Only loopback endpoints are accepted, the proxy listens on 127.0.0.1 only, and :meth:`stop` ends
only the process it started, by its pid.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest

ADDON = Path(__file__).resolve().parent / "fault_addon.py"
LOOPBACK = {"127.0.0.1", "localhost"}
COUNTERS = ("requests", "passed", "delayed", "slowdown", "internal_error", "drop", "outage", "refused")
RULE_KEYS = {"slowdown", "internal_error", "drop", "latency_ms", "outage_keys", "outage_until", "outage_s", "seed"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: mitmproxy pins h11 and cryptography below what huggingface_hub and moto need, so it lives in a
#: virtualenv of its own (``make test`` creates it); it is a separate process anyway.
PROXY_VENV = Path(__file__).resolve().parents[1] / ".venv-proxy"


def _mitmdump() -> str:
    for candidate in (PROXY_VENV / "bin" / "mitmdump", Path(sys.executable).parent / "mitmdump"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("mitmdump")
    if not found:
        raise RuntimeError("mitmdump not found: `make proxy` installs mitmproxy==11.0.2 into .venv-proxy")
    return found


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # a new inode: the addon notices even within one mtime tick


class FaultProxy:
    """mitmdump on a free 127.0.0.1 port forwarding to ``upstream``, with faults set at run time."""

    def __init__(self, upstream: str, startup_timeout_s: float = 30.0):
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or parsed.hostname not in LOOPBACK or parsed.port is None:
            raise ValueError(f"fault proxy upstream must be http://127.0.0.1:<port>, got {upstream!r}")
        self.upstream = f"http://127.0.0.1:{parsed.port}"
        self.startup_timeout_s = startup_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="fault-proxy-"))
        self.rules_path, self.stats_path = self._dir / "rules.json", self._dir / "stats.json"
        self.log_path = self._dir / "mitmdump.log"
        self._rules: dict[str, Any] = {}
        self._generation = 0
        self._proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("fault proxy is not started")
        return f"http://127.0.0.1:{self.port}"

    # -- process ---------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._proc is not None:
            return self
        self._publish()
        last_error = "?"
        for _ in range(3):  # the free port may be taken between probing and mitmdump binding it
            self.port = _free_port()
            log = open(self.log_path, "ab")
            try:
                self._proc = subprocess.Popen(
                    [_mitmdump(), "--mode", f"reverse:{self.upstream}", "--listen-host", "127.0.0.1",
                     "--listen-port", str(self.port), "-s", str(ADDON), "-q",
                     "--set", f"confdir={self._dir / 'conf'}", "--set", "keep_host_header=true",
                     "--set", f"fault_rules={self.rules_path}", "--set", f"fault_stats={self.stats_path}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self._dir)
            finally:
                log.close()
            try:
                self._wait_ready()
                self._generation += 1  # counters start after the readiness probe
                self._publish()
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
        raise RuntimeError(f"fault proxy did not start: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self._proc.returncode}: {self._log_tail()}")
            if self.stats_path.exists():  # the addon is loaded and has read the rules
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                    conn.request("GET", "/")
                    conn.getresponse().read()
                    conn.close()
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"mitmdump did not answer on port {self.port} within {self.startup_timeout_s:.0f} s: "
                           f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the mitmdump this object started (terminate, then kill after ``timeout_s``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rules and stats -------------------------------------------------------------------------

    def _publish(self) -> None:
        _write_atomic(self.rules_path, {**self._rules, "generation": self._generation})

    def set(self, **rules: Any) -> FaultProxy:
        """Merge ``rules`` into the current ones; takes effect from the proxy's next request."""
        if unknown := set(rules) - RULE_KEYS:
            raise ValueError(f"unknown fault rules {sorted(unknown)}; known: {sorted(RULE_KEYS)}")
        for name in ("slowdown", "internal_error", "drop"):
            if name in rules and not 0 <= float(rules[name]) <= 1:
                raise ValueError(f"{name} is a probability, got {rules[name]}")
        if "outage_s" in rules:
            rules["outage_until"] = time.time() + float(rules.pop("outage_s"))
        if isinstance(rules.get("outage_keys"), str):
            rules["outage_keys"] = [rules["outage_keys"]]
        self._rules.update(rules)
        self._publish()
        return self

    def clear(self) -> FaultProxy:
        """No faults, counters back to zero."""
        self._rules = {}
        self._generation += 1
        self._publish()
        return self

    def stats(self) -> dict[str, int]:
        """Counters since start or the last :meth:`clear` (written before each response is sent)."""
        try:
            data = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("generation") != self._generation:  # no request seen since clear()
            return dict.fromkeys(COUNTERS, 0)
        return {k: int(data.get(k, 0)) for k in COUNTERS}

    def gets(self) -> dict[str, int]:
        """GET requests passed upstream since start or the last :meth:`clear`, by path
        (``/bucket/key``: the proxy's upstream is a path-style endpoint)."""
        try:
            data = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            data = {}
        return dict(data.get("gets", {})) if data.get("generation") == self._generation else {}

    @property
    def injected(self) -> int:
        s = self.stats()
        return sum(s.get(k, 0) for k in ("slowdown", "internal_error", "drop", "outage"))

    @contextlib.contextmanager
    def env(self) -> Iterator[str]:
        """Point ``AWS_ENDPOINT_URL`` at the proxy for the block (clients created inside use it)."""
        with aws_endpoint(self.endpoint):
            yield self.endpoint


@contextlib.contextmanager
def aws_endpoint(url: str) -> Iterator[str]:
    """Set ``AWS_ENDPOINT_URL`` for the block and restore the previous value (or its absence)."""
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        yield url
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.fixture
def fault_proxy(s3_endpoint):
    """A started :class:`FaultProxy` in front of the session's moto server, with no rules."""
    proxy = FaultProxy(s3_endpoint).start()
    try:
        yield proxy
    finally:
        proxy.close()
