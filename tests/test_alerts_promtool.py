"""The alert rules, evaluated by Prometheus's own ``promtool``.

``promtool check rules`` parses them as Prometheus does. ``promtool test
rules`` then plays, for every alert, series a homeserver with that fault
would export (the counters rising, the lag standing still) and expects the
alert to fire with its labels and its annotations as Prometheus renders them,
and nothing to fire on a healthy homeserver. The test file is written here
from the rules: each alert's expected description is its template with the
labels and the value of the scenario put in (``render``), so a template
naming a label the alert does not carry fails.

``promtool`` comes with Debian's ``prometheus`` package, which ``.ci/run``
installs; locally the test is skipped without it, and fails under ``CI``.
"""

import os
import re
import shutil
import subprocess
from typing import Any

import yaml
from twisted.trial import unittest

from tests.test_contrib import ALERTS, alert_rules

TARGET = {"job": "synapse", "instance": "hs1:9000", "server_name": "example.org"}


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in {**TARGET, **labels}.items())
    return {"series": f"{metric}{{{selector}}}", "values": values}


#: alert -> (input series, evaluation time, the alert's $value then). Counters
#: rise at a steady rate, so that increase() and rate(), which extrapolate to
#: the window's edges, give whole numbers.
SCENARIOS: dict[str, tuple[list[dict[str, str]], str, float]] = {
    "NidstateShadowMismatch": (
        [series("synapse_nidstate_lookups_total", "0+1x40", outcome="mismatched")], "30m", 15
    ),
    "NidstateGroupReadMismatch": (
        [series("synapse_nidstate_group_reads_total", "0+1x40", outcome="mismatched")], "30m", 15
    ),
    "NidstateReadFailures": (
        [
            series("synapse_nidstate_lookups_total", "0+1x40", outcome="failed"),
            series("synapse_nidstate_group_reads_total", "0+2x40", outcome="failed"),
        ],
        "30m",
        45,
    ),
    "NidstateStateUnavailable": (
        [
            series("synapse_nidstate_lookups_total", "0+1x40", outcome="unavailable"),
            series("synapse_nidstate_group_reads_total", "0x40", outcome="unavailable"),
        ],
        "30m",
        15,
    ),
    "NidstateMirrorWriteFailures": (
        [
            series("synapse_nidstate_mirror_total", "0+1x40", what="write_failures"),
            series("synapse_nidstate_mirror_total", "0x40", what="plan_failures"),
        ],
        "30m",
        15,
    ),
    "NidstateReclaimRefused": (
        [series("synapse_nidstate_reclaim_total", "0+1x90", what="groups_refused")], "70m", 60
    ),
    "NidstateMigrationStuck": (
        [
            series("synapse_nidstate_migration_lag_stream_positions", "100x70"),
            series("synapse_nidstate_migration_events_total", "5000x70"),
        ],
        "60m",
        100,
    ),
    "NidstateHighFallbackRatio": (
        [
            series("synapse_nidstate_lookups_total", "0+1x120", outcome="fallback"),
            series("synapse_nidstate_lookups_total", "0+3x120", outcome="served"),
        ],
        "100m",
        0.25,
    ),
}

#: A healthy homeserver in mode serve: everything served, the migration done.
HEALTHY = [
    *(
        series("synapse_nidstate_lookups_total", values, outcome=outcome)
        for outcome, values in (
            ("served", "0+10x120"), ("fallback", "0x120"), ("mismatched", "0x120"),
            ("failed", "0x120"), ("unavailable", "0x120"),
        )
    ),
    *(
        series("synapse_nidstate_group_reads_total", "0x120", outcome=outcome)
        for outcome in ("mismatched", "failed", "unavailable")
    ),
    *(
        series("synapse_nidstate_mirror_total", "0x120", what=what)
        for what in ("write_failures", "plan_failures")
    ),
    series("synapse_nidstate_reclaim_total", "0x120", what="groups_refused"),
    series("synapse_nidstate_migration_lag_stream_positions", "0x120"),
    series("synapse_nidstate_migration_events_total", "5000x120"),
]


def humanize(value: float) -> str:
    """Prometheus's ``humanize`` for the values used here (below 1,000)."""
    assert 0 <= value < 1000
    return f"{value:.4g}"


def render(template: str, labels: dict[str, str], value: float) -> str:
    """The templates' subset the rules use: ``$labels.NAME``, ``$value`` with
    ``humanize`` or ``humanizePercentage``."""

    def one(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        if expression.startswith("$labels."):
            return labels[expression[len("$labels."):]]
        if expression == "$value | humanize":
            return humanize(value)
        if expression == "$value | humanizePercentage":
            return f"{value * 100:.4g}%"
        raise AssertionError(f"a template the test does not know: {expression}")

    return re.sub(r"\{\{(.*?)\}\}", one, template)


def promtool_tests(rules: dict[str, Any]) -> dict[str, Any]:
    tests = []
    for rule in alert_rules(rules):
        name = rule["alert"]
        inputs, at, value = SCENARIOS[name]
        labels = {**TARGET, **rule["labels"]}
        tests.append({
            "name": name,
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [{
                "eval_time": at,
                "alertname": name,
                "exp_alerts": [{
                    "exp_labels": labels,
                    "exp_annotations": {
                        key: render(text, labels, value)
                        for key, text in rule["annotations"].items()
                    },
                }],
            }],
        })
        tests.append({
            "name": f"{name}, healthy",
            "interval": "1m",
            "input_series": HEALTHY,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
        })
    return {"rule_files": [ALERTS.name], "evaluation_interval": "1m", "tests": tests}


class PromtoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.promtool = shutil.which("promtool")
        if self.promtool is None:
            if os.environ.get("CI"):
                self.fail("promtool is required in CI (Debian's prometheus package)")
            raise unittest.SkipTest("promtool is not installed (apt-get install prometheus)")

    def run_promtool(self, *args: str, cwd: str | None = None) -> str:
        result = subprocess.run(
            [self.promtool, *args],  # type: ignore[list-item]
            cwd=cwd, capture_output=True, text=True, timeout=120,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        return output

    def test_check_rules(self) -> None:
        with open(ALERTS) as f:
            count = len(alert_rules(yaml.safe_load(f)))
        output = self.run_promtool("check", "rules", str(ALERTS))
        self.assertIn(f"SUCCESS: {count} rules found", output)

    def test_every_alert_fires_on_its_fault_and_not_on_a_healthy_server(self) -> None:
        with open(ALERTS) as f:
            rules = yaml.safe_load(f)
        self.assertEqual(
            sorted(SCENARIOS), sorted(rule["alert"] for rule in alert_rules(rules))
        )
        directory = self.mktemp()
        os.makedirs(directory)
        shutil.copy(ALERTS, directory)
        with open(os.path.join(directory, "tests.yml"), "w") as f:
            yaml.safe_dump(promtool_tests(rules), f, sort_keys=False)
        output = self.run_promtool("test", "rules", "tests.yml", cwd=directory)
        self.assertIn("SUCCESS", output)
