"""Monitoring against the real thing: a Prometheus server scraping a real
Synapse process with the module, its alerts firing, the dashboard's queries
answered.

Prometheus (Debian's ``prometheus`` package, which ``.ci/run`` installs)
scrapes the homeserver's metrics listener every second and evaluates
``contrib/prometheus/nidstate-alerts.yml`` every second. Then the homeserver
meets two faults an operator must hear about: a corrupted block of the
module's tables makes reads fail (answered by Synapse: ``NidstateReadFailures``)
and makes the background reclaim job refuse the groups whose proof reads it
(``NidstateReclaimRefused``). Both alerts must fire, seen through Prometheus's
HTTP API; and every query of the Grafana dashboard, its variables filled in as
Grafana would, must return data from that Prometheus.
"""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from typing import Any

import yaml
from twisted.trial import unittest

from tests.test_contrib import ALERTS, DASHBOARD, dashboard_panels
from tests.test_e2e import (
    PASSWORD,
    SERVER_NAME,
    USERS,
    ServerTestCase,
    build_room,
    free_port,
    q,
    replay,
)
from tests.test_e2e_faults import flip_a_byte

#: How long Prometheus is given to see a fault and fire its alert.
ALERT_TIMEOUT = 90.0


class Prometheus:
    """``prometheus`` on a temporary directory, scraping one target."""

    def __init__(self, directory: str, target: str) -> None:
        self.port = free_port()
        self.directory = directory
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "synapse",
                    "metrics_path": "/_synapse/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        self.config_path = os.path.join(directory, "prometheus.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = os.path.join(directory, "prometheus.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={os.path.join(self.directory, 'data')}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: self.get("/-/ready", raw=True), "ready")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)

    def get(self, path: str, raw: bool = False, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().decode()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer is not None and answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def wait_for(self, condition: Any, what: str, timeout: float = ALERT_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_tail()}")
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: not {what} within {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-30:])


def grafana_expr(expr: str, instance: str) -> str:
    """A dashboard query with its variables as Grafana fills them in."""
    values = {
        "instance": instance, "job": "synapse", "server_name": SERVER_NAME,
        "bucket_size": "30s", "__range": "5m",
    }
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


class PrometheusEndToEndTest(ServerTestCase):
    def test_alerts_fire_and_every_dashboard_query_has_data(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if os.environ.get("CI"):
                self.fail("prometheus is required in CI (Debian's prometheus package)")
            raise unittest.SkipTest("prometheus is not installed (apt-get install prometheus)")

        # A room's history, written with the module (mode serve).
        server = self.start("serve")
        for user in USERS:
            server.register(user)
        tokens = {
            user: server.ok(
                "POST", "/_matrix/client/v3/login",
                body={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                      "password": PASSWORD},
            )["access_token"]
            for user in USERS
        }
        room_id = build_room(server, tokens)
        rooms = f"/_matrix/client/v3/rooms/{q(room_id)}"
        page = server.ok("GET", f"{rooms}/messages?dir=b&limit=100", tokens["alice"])
        timeline = [e["event_id"] for e in reversed(page["chunk"])]
        server.stop()

        # The newest block of the last event's snapshot corrupted: the few
        # snapshots that list it cannot be read, the rest are served.
        flip_a_byte(os.path.join(self.data_dir, "homeserver.db"), timeline[-1], which=-1)
        # The background reclaim job's first batch only once Prometheus has
        # scraped the homeserver (a counter's first sample is no increase).
        server = self.start("serve", {"reclaim": {"enabled": True, "interval_ms": 15000}})
        instance = f"127.0.0.1:{server.metrics_port}"
        prometheus = Prometheus(self.data_dir, instance)
        self.addCleanup(prometheus.stop)
        prometheus.start(binary)
        prometheus.wait_for(
            lambda: prometheus.query('count_over_time(up{job="synapse"}[1m]) >= 3'), "scraping"
        )
        replay(server, tokens, [
            ("context", user, f"{rooms}/context/{q(event_id)}?limit=3")
            for event_id in timeline for user in ("alice", "bob")
        ])

        def firing() -> set[str]:
            answer = prometheus.get("/api/v1/alerts") or {"data": {"alerts": []}}
            return {
                a["labels"]["alertname"] for a in answer["data"]["alerts"]
                if a["state"] == "firing" and a["labels"].get("instance") == instance
            }

        expected = {"NidstateReadFailures", "NidstateReclaimRefused"}
        prometheus.wait_for(lambda: expected <= firing(), f"firing {sorted(expected)}")
        self.assertEqual(firing() & {"NidstateShadowMismatch", "NidstateStateUnavailable"}, set())

        # Every query of the dashboard answers with data from this Prometheus.
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        empty = []
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                if "expr" in target and not prometheus.query(
                    grafana_expr(target["expr"], instance)
                ):
                    empty.append(f"{panel['title']} ({target.get('refId')}): {target['expr']}")
        self.assertEqual(empty, [])
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            query = variable["query"]["query"]
            selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query).groups()  # type: ignore[union-attr]
            values = prometheus.get(
                f"/api/v1/label/{label}/values", **{"match[]": grafana_expr(selector, instance)}
            )
            self.assertIn(
                {"instance": instance, "job": "synapse", "server_name": SERVER_NAME}[label],
                values["data"], query,
            )
        prometheus.stop()
        server.stop()
