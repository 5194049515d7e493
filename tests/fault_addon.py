"""mitmproxy addon that injects S3 faults, driven by a JSON rules file (see tests/fault_proxy.py).

Loaded by ``mitmdump -s tests/fault_addon.py --set fault_rules=RULES --set fault_stats=STATS`` in
reverse-proxy mode in front of a loopback S3 server. Before every request it re-reads the rules
file if it changed (new inode, mtime or size: the controller replaces it atomically), then in
this order:

* ``latency_ms``: sleep that long before doing anything else (the request still goes through);
* ``outage_keys`` / ``outage_until``: a request whose path contains one of the substrings gets
  ``503 SlowDown`` until the wall-clock deadline ``outage_until`` (seconds since the epoch);
* one draw of the seeded RNG against ``drop`` (kill the connection, no response), then
  ``slowdown`` (503 SlowDown), then ``internal_error`` (500 InternalError) — the probabilities add.

The RNG is reseeded with ``seed`` whenever the rules change, so a given request sequence meets
the same faults on every run. Counters of what was injected are written back to the stats file
(atomically, before the client sees the response) and reset when ``generation`` changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from urllib.parse import unquote

from mitmproxy import ctx, http

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COUNTERS = ("requests", "passed", "delayed", "slowdown", "internal_error", "drop", "outage", "refused")

SLOWDOWN_BODY = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
INTERNAL_BODY = (b"<Error><Code>InternalError</Code><Message>We encountered an internal error. "
                 b"Please try again.</Message></Error>")


def _xml_error(flow: http.HTTPFlow, status: int, body: bytes) -> http.Response:
    """An S3 error response; a HEAD gets none of the body (a body would poison the keep-alive)."""
    if flow.request.method == "HEAD":
        return http.Response.make(status, b"", {"Content-Type": "application/xml", "Content-Length": "0"})
    return http.Response.make(status, body, {"Content-Type": "application/xml"})


class FaultInjector:
    def __init__(self) -> None:
        self.rules: dict = {}
        self.signature: tuple | None = None
        self.generation = None
        self.rng = random.Random(0)
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.gets: dict[str, int] = {}  # GET requests passed upstream, by path (no query)

    def load(self, loader) -> None:
        loader.add_option("fault_rules", str, "", "JSON file with the fault rules (re-read when it changes)")
        loader.add_option("fault_stats", str, "", "JSON file the injected-fault counters are written to")

    def running(self) -> None:
        self._reload()
        self._write_stats()

    def _reload(self) -> None:
        path = ctx.options.fault_rules
        if not path:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self.signature:
            return
        try:
            with open(path) as f:
                rules = json.load(f)
        except (OSError, ValueError):
            return  # mid-write by a non-atomic editor: keep the old rules, retry next request
        self.signature, self.rules = signature, rules
        self.rng = random.Random(rules.get("seed", 0))
        if rules.get("generation") != self.generation:
            self.generation = rules.get("generation")
            self.stats = dict.fromkeys(COUNTERS, 0)
            self.gets = {}

    def _write_stats(self) -> None:
        path = ctx.options.fault_stats
        if not path:
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.stats, "gets": self.gets, "generation": self.generation}, f)
        os.replace(tmp, path)

    def _count(self, what: str) -> None:
        self.stats[what] += 1
        self._write_stats()

    async def request(self, flow: http.HTTPFlow) -> None:
        self._reload()
        rules = self.rules
        self.stats["requests"] += 1
        if flow.request.host not in LOOPBACK:  # this proxy only ever talks to loopback servers
            flow.response = http.Response.make(502, b"fault proxy: upstream is not on loopback")
            self._count("refused")
            return
        latency = float(rules.get("latency_ms", 0) or 0)
        if latency > 0:
            self.stats["delayed"] += 1
            await asyncio.sleep(latency / 1000)
        path = unquote(flow.request.path)
        if rules.get("outage_keys") and time.time() < float(rules.get("outage_until", 0)) \
                and any(k in path for k in rules["outage_keys"]):
            flow.response = _xml_error(flow, 503, SLOWDOWN_BODY)
            self._count("outage")
            return
        u = self.rng.random()
        drop = float(rules.get("drop", 0))
        slowdown = drop + float(rules.get("slowdown", 0))
        internal = slowdown + float(rules.get("internal_error", 0))
        if u < drop:
            self._count("drop")
            flow.kill()
        elif u < slowdown:
            flow.response = _xml_error(flow, 503, SLOWDOWN_BODY)
            self._count("slowdown")
        elif u < internal:
            flow.response = _xml_error(flow, 500, INTERNAL_BODY)
            self._count("internal_error")
        else:
            if flow.request.method == "GET":
                self.gets[path.split("?")[0]] = self.gets.get(path.split("?")[0], 0) + 1
            self._count("passed")


addons = [FaultInjector()]
