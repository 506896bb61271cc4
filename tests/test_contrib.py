"""contrib/: the Grafana dashboard and the Prometheus alerts ask only for what the module exports.

Every PromQL expression (dashboard targets, template variables, alert rules) is
parsed; each metric name must be one the module declares (its collector and
histograms, or Synapse's cache metrics for the module's caches) *and* one a
real homeserver with the module loaded actually exposes, scraped from the
Prometheus registry; every label matcher must name a label of that metric and,
for ``outcome``, ``what``, ``path`` and ``name``, take a value the homeserver
emits (a cache selector must match only the module's caches, at least one).
"""

import copy
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import attr
import yaml
from prometheus_client import REGISTRY, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from synapse.util import caches as synapse_caches
from twisted.internet import reactor, task
from twisted.trial import unittest

from synapse_nidstate.runtime import metrics
from tests.harness import HomeserverTestCase

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "nidstate.json"
ALERTS = ROOT / "contrib" / "prometheus" / "nidstate-alerts.yml"

#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
#: Labels whose values must be ones the module emits.
CHECKED_LABELS = {"outcome", "what", "path", "name"}
#: Synapse's cache metrics that describe an LruCache (the module has no ResponseCache).
SYNAPSE_CACHE_METRICS = (
    synapse_caches.cache_size,
    synapse_caches.cache_hits,
    synapse_caches.cache_evicted,
    synapse_caches.cache_total,
    synapse_caches.cache_max_size,
    synapse_caches.cache_memory_usage,
)
CACHE_PREFIX = "synapse_util_caches_"

_FUNCTIONS = {
    "abs", "avg", "ceil", "clamp_min", "count", "delta", "histogram_quantile",
    "increase", "irate", "max", "min", "rate", "round", "sum", "vector",
}  # fmt: skip
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool"}
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<range>\[[^\]]+\])
    |(?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>==|!=|=~|!~|>=|<=|[-+*/%^(){},=<>])
    """,
    re.VERBOSE,
)


@attr.s(auto_attribs=True, frozen=True)
class Selector:
    metric: str
    #: (label, operator, value)
    matchers: tuple[tuple[str, str, str], ...]


@attr.s(auto_attribs=True)
class Query:
    selectors: list[Selector]
    grouping_labels: set[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenise {expr[pos:]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "space":
            out.append((m.lastgroup or "", m.group()))
    return out


def parse_promql(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression (the subset contrib/ uses)."""
    toks = _tokens(expr)
    query = Query([], set())
    i = 0

    def expect(kind: str, text: str | None = None) -> str:
        nonlocal i
        if i >= len(toks) or toks[i][0] != kind or (text is not None and toks[i][1] != text):
            raise ValueError(f"expected {text or kind} at token {i} of {expr!r}")
        i += 1
        return toks[i - 1][1]

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "op" and text == "{":
            raise ValueError(f"selector without a metric name in {expr!r}")
        if kind != "ident":
            i += 1
            continue
        if text in _GROUPING:
            i += 1
            if nxt == "(":
                i += 1
                while toks[i][1] != ")":
                    if toks[i][0] == "ident":
                        query.grouping_labels.add(toks[i][1])
                    i += 1
                i += 1
            continue
        if text in _KEYWORDS:
            i += 1
            continue
        if text in _FUNCTIONS:  # aggregations may be followed by "by (...)"
            i += 1
            continue
        if nxt == "(":
            raise ValueError(f"unknown function {text!r} in {expr!r}")
        # A metric name, with or without label matchers.
        i += 1
        matchers = []
        if i < len(toks) and toks[i][1] == "{":
            i += 1
            while toks[i][1] != "}":
                label = expect("ident")
                op = expect("op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"bad matcher operator {op!r} in {expr!r}")
                value = expect("string")[1:-1]
                matchers.append((label, op, value))
                if toks[i][1] == ",":
                    i += 1
            i += 1
        query.selectors.append(Selector(text, tuple(matchers)))
    return query


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, Query]]:
    """(where, expr, parsed) of every target and every query variable."""
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                where = f"panel {panel['title']!r} target {target.get('refId')}"
                out.append((where, target["expr"], parse_promql(target["expr"])))
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text.strip())
        if m is None:
            raise ValueError(f"variable {var['name']}: not label_values(selector, label): {text!r}")
        query = parse_promql(m.group(1))
        query.grouping_labels.add(m.group(2))
        out.append((f"variable {var['name']!r}", text, query))
    return out


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["groups"] for rule in group["rules"]]


def alert_queries(rules: dict[str, Any]) -> list[tuple[str, str, Query]]:
    return [
        (
            f"alert {rule.get('alert') or rule.get('record')}",
            rule["expr"],
            parse_promql(rule["expr"]),
        )
        for rule in alert_rules(rules)
    ]


# ------------------------------------------------------------------ what is exported


def declared_metric_names() -> dict[str, str]:
    """Sample names the module's code declares -> the family they belong to."""
    families = list(metrics.COLLECTOR.collect())
    for histogram in vars(metrics).values():  # every histogram the module defines
        if isinstance(histogram, Histogram):
            families.extend(histogram.collect())
    for gauge in SYNAPSE_CACHE_METRICS:
        families.extend(gauge.collect())
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
    }
    names = {}
    for family in families:
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


@attr.s(auto_attribs=True)
class Exported:
    """What one homeserver's metrics endpoint shows for its server_name."""

    #: sample name -> label -> values seen
    labels: dict[str, dict[str, set[str]]]
    #: the module's caches, by its own store
    module_caches: set[str]
    #: every cache name in Synapse's cache metrics for this server
    all_caches: set[str]


def scrape(server_name: str) -> dict[str, dict[str, set[str]]]:
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    text = generate_latest(REGISTRY).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("server_name") != server_name:
                continue
            for label, value in sample.labels.items():
                out[sample.name][label].add(value)
    return out


def alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a regex (``a|b(c|d)`` -> ``a``, ``b(c|d)``)."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 1
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    out.append(pattern[start:])
    return out


def covered_values(
    queries: list[tuple[str, str, Query]], metric: str, label: str, emitted: set[str]
) -> set[str]:
    """The values of ``label`` some query selects (a selector without a matcher on it: all)."""
    covered: set[str] = set()
    for _, _, query in queries:
        for sel in query.selectors:
            if sel.metric != metric:
                continue
            matchers = [(op, value) for name, op, value in sel.matchers if name == label]
            if not matchers:
                covered |= emitted
            for op, value in matchers:
                pattern = re.escape(value) if op == "=" else value
                if op in ("=", "=~"):
                    covered |= {v for v in emitted if re.fullmatch(pattern, v)}
    return covered


def problems(queries: list[tuple[str, str, Query]], exported: Exported) -> list[str]:
    """Everything in the queries that the module does not export, as messages."""
    declared = declared_metric_names()
    found = []
    for where, expr, query in queries:
        labels_in_query = set(TARGET_LABELS)
        for sel in query.selectors:
            if sel.metric not in declared:
                found.append(f"{where}: {sel.metric} is not a metric the module declares")
                continue
            if sel.metric.startswith(CACHE_PREFIX):
                names = [m for m in sel.matchers if m[0] == "name" and m[1] in ("=", "=~")]
                if not names:
                    found.append(
                        f"{where}: {sel.metric} without a name= selector for the module's caches"
                    )
            seen = exported.labels.get(sel.metric)
            if not seen:
                found.append(f"{where}: {sel.metric} is declared but not exposed by the homeserver")
                continue
            labels_in_query |= seen.keys()
            for label, op, value in sel.matchers:
                if label not in seen and label not in TARGET_LABELS:
                    found.append(f"{where}: {sel.metric} has no label {label!r}")
                    continue
                if label not in CHECKED_LABELS or op not in ("=", "=~"):
                    continue
                pattern = re.escape(value) if op == "=" else value
                # Each alternative of a regex must match something (a typo in one is a bug).
                for alternative in alternatives(pattern):
                    if not any(re.fullmatch(alternative, v) for v in seen[label]):
                        found.append(
                            f"{where}: {sel.metric}{{{label}{op}{value!r}}}: {alternative!r} "
                            f"matches none of {sorted(seen[label])}"
                        )
                if label == "name":
                    others = {c for c in exported.all_caches if re.fullmatch(pattern, c)}
                    others -= exported.module_caches
                    if others:
                        found.append(
                            f"{where}: name{op}{value!r} also matches Synapse's {sorted(others)}"
                        )
        for label in query.grouping_labels - labels_in_query:
            found.append(f"{where}: groups by {label!r}, which none of its metrics has ({expr})")
    return found


_EXPORTED: Exported | None = None


class ContribTestCase(HomeserverTestCase):
    module_config = {"mode": "shadow"}

    async def exported(self) -> Exported:
        """Scraped once per run from a real homeserver with the module (SQLite)."""
        global _EXPORTED
        if _EXPORTED is None:
            hs = await self.make_homeserver(self.module_config)
            # Let start-up callbacks run before the test ends and the server stops
            # (Synapse 1.157 starts the user-parting loop from one and fails
            # loudly if the server has been shut down by then).
            await task.deferLater(reactor, 0.1, lambda: None)
            labels = scrape(hs.hostname)
            cache_names = labels[synapse_caches.cache_size._name]["name"]
            _EXPORTED = Exported(
                labels={name: dict(values) for name, values in labels.items()},
                module_caches=set(self.module(hs).store.named_caches),
                all_caches=set(cache_names),
            )
        return _EXPORTED

    def load_dashboard(self) -> dict[str, Any]:
        with open(DASHBOARD) as f:
            return json.load(f)

    def load_alerts(self) -> dict[str, Any]:
        with open(ALERTS) as f:
            return yaml.safe_load(f)

    # -------------------------------------------------------------- the homeserver

    async def test_homeserver_exports_the_module_metrics(self) -> None:
        """The scrape this file relies on has every declared name and the module's caches."""
        exported = await self.exported()
        self.assertIn("nidstate_blocks", exported.module_caches)
        self.assertTrue(all(c.startswith("nidstate_") for c in exported.module_caches))
        # Every module cache is exported by Synapse's cache metrics, under its name.
        self.assertLessEqual(exported.module_caches, exported.all_caches)
        self.assertEqual(
            {c for c in exported.all_caches if c.startswith("nidstate_")}, exported.module_caches
        )
        for name in declared_metric_names():
            if name == synapse_caches.cache_memory_usage._name:
                continue  # only with Synapse's TRACK_MEMORY_USAGE
            self.assertIn(name, exported.labels, name)
        lookups = exported.labels["synapse_nidstate_lookups_total"]
        self.assertEqual(lookups["outcome"], {f.name for f in attr.fields(metrics.LookupStats)})
        mirror = exported.labels["synapse_nidstate_mirror_total"]
        self.assertEqual(mirror["what"], {f.name for f in attr.fields(metrics.MirrorStats)})
        self.assertEqual(
            exported.labels["synapse_nidstate_lookup_seconds_bucket"]["path"], {"mirror", "native"}
        )

    # -------------------------------------------------------------- the dashboard

    async def test_dashboard_queries_only_exported_metrics(self) -> None:
        queries = dashboard_queries(self.load_dashboard())
        self.assertEqual(problems(queries, await self.exported()), [])

    async def test_dashboard_shows_everything_the_module_counts(self) -> None:
        """A new counter, outcome or histogram label value needs a panel."""
        exported = await self.exported()
        queries = dashboard_queries(self.load_dashboard())
        used = {sel.metric for _, _, q in queries for sel in q.selectors}
        module_families = {
            family for name, family in declared_metric_names().items()
            if not name.startswith(CACHE_PREFIX)
        }  # fmt: skip
        shown = {family for name, family in declared_metric_names().items() if name in used}
        self.assertEqual(module_families - shown, set())
        for metric, label in [
            ("synapse_nidstate_lookups_total", "outcome"),
            ("synapse_nidstate_mirror_total", "what"),
            ("synapse_nidstate_lookup_seconds_bucket", "path"),
        ]:
            emitted = exported.labels[metric][label]
            self.assertEqual(
                emitted - covered_values(queries, metric, label, emitted), set(), metric
            )
        cache_names = exported.labels["synapse_util_caches_cache_size"]["name"]
        self.assertEqual(
            exported.module_caches
            - covered_values(queries, "synapse_util_caches_cache_size", "name", cache_names),
            set(),
        )

    async def test_alerts_query_only_exported_metrics(self) -> None:
        queries = alert_queries(self.load_alerts())
        self.assertEqual(problems(queries, await self.exported()), [])

    async def test_wrong_queries_are_found(self) -> None:
        """The check itself: a broken copy of the dashboard is reported, line by line."""
        exported = await self.exported()
        dashboard = self.load_dashboard()
        broken = copy.deepcopy(dashboard)
        target = next(
            t for p in dashboard_panels(broken) for t in p.get("targets", []) if "expr" in t
        )
        target["expr"] = target["expr"].replace("synapse_nidstate_", "synapse_nidstat_", 1)
        self.assertIn(
            "is not a metric the module declares",
            "\n".join(problems(dashboard_queries(broken), exported)),
        )
        for expr, expected in [
            ('rate(synapse_nidstate_lookups_total{outcome="missed"}[5m])', "matches none of"),
            ('rate(synapse_nidstate_mirror_total{what=~"write_failure"}[5m])', "matches none of"),
            (
                'synapse_nidstate_mirror_total{what=~"plan_failures|write_failure"}',
                "'write_failure'",
            ),
            ('synapse_nidstate_lookup_seconds_count{path="cache"}', "matches none of"),
            ("synapse_nidstate_lookups", "is not a metric the module declares"),
            ("synapse_nidstate_lookup_seconds_total", "is not a metric the module declares"),
            ("synapse_util_caches_cache_hits_total", "is not a metric the module declares"),
            ("synapse_util_caches_response_cache_size", "is not a metric the module declares"),
            ("synapse_http_server_requests_received_total", "is not a metric the module declares"),
            ('synapse_util_caches_cache_size{name="nidstate_nope"}', "matches none of"),
            ('synapse_util_caches_cache_size{name=~".*"}', "also matches Synapse's"),
            ("synapse_util_caches_cache_size", "without a name= selector"),
            ('synapse_nidstate_migration_events_total{room_id="!a:b"}', "has no label"),
            ("sum by (outcome) (synapse_nidstate_migration_events_total)", "groups by"),
        ]:
            found = problems([("t", expr, parse_promql(expr))], exported)
            self.assertIn(expected, "\n".join(found), expr)
        for expr in ["rated(synapse_nidstate_lookups_total[5m])", '{__name__="x"}']:
            self.assertRaises(ValueError, parse_promql, expr)


class StructureTests(unittest.TestCase):
    """The files' shape, no homeserver needed."""

    def test_parser(self) -> None:
        q = parse_promql(
            "histogram_quantile(0.95, sum by (le, path) (rate(synapse_nidstate_lookup_seconds_bucket"
            '{instance="$instance",job=~"$job",path=~"mirror|native"}[$bucket_size])))'
            ' / on (path) group_left sum by (path) (x_total{a!="b"}) > bool 0'
        )
        self.assertEqual(
            q.selectors,
            [
                Selector(
                    "synapse_nidstate_lookup_seconds_bucket",
                    (
                        ("instance", "=", "$instance"),
                        ("job", "=~", "$job"),
                        ("path", "=~", "mirror|native"),
                    ),
                ),
                Selector("x_total", (("a", "!=", "b"),)),
            ],
        )
        self.assertEqual(q.grouping_labels, {"le", "path"})
        self.assertEqual(alternatives(r"a|b(c|d)|[|]|e\|f"), ["a", "b(c|d)", "[|]", r"e\|f"])

    def test_dashboard_structure(self) -> None:
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        self.assertGreaterEqual(dashboard["schemaVersion"], 37)
        self.assertIn(
            {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"},
            [{k: i[k] for k in ("name", "type", "pluginId")} for i in dashboard["__inputs"]],
        )
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual(variables["DS_PROMETHEUS"]["type"], "datasource")
        self.assertEqual(variables["DS_PROMETHEUS"]["query"], "prometheus")
        for name in ("instance", "job"):
            self.assertEqual(variables[name]["type"], "query")
        panels = dashboard_panels(dashboard)
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)), "panel ids must be unique")
        for panel in panels:
            title = panel.get("title")
            self.assertTrue(title, panel)
            self.assertTrue(panel.get("description"), f"{title}: no description")
            self.assertEqual(panel["datasource"]["uid"], "${DS_PROMETHEUS}", title)
            self.assertEqual(set(panel["gridPos"]), {"h", "w", "x", "y"}, title)
            if panel["type"] == "row":
                continue
            self.assertTrue(panel.get("targets"), f"{title}: no targets")
            refs = [t["refId"] for t in panel["targets"]]
            self.assertEqual(len(refs), len(set(refs)), title)
            for t in panel["targets"]:
                self.assertEqual(t["datasource"]["uid"], "${DS_PROMETHEUS}", title)
                self.assertTrue(t.get("expr"), f"{title} {t['refId']}: no expr")
                # Every series is scoped to the chosen instance and jobs.
                for sel in parse_promql(t["expr"]).selectors:
                    matchers = {(label, op, value) for label, op, value in sel.matchers}
                    self.assertIn(("instance", "=", "$instance"), matchers, title)
                    self.assertIn(("job", "=~", "$job"), matchers, title)
        # The shadow-mismatch stats (lookups, group reads) turn red above 0.
        mismatch_panels = [
            p for p in panels
            if p["type"] == "stat" and any('outcome="mismatched"' in t["expr"] for t in p["targets"])
        ]  # fmt: skip
        self.assertEqual(len(mismatch_panels), 2)
        for mismatch in mismatch_panels:
            steps = mismatch["fieldConfig"]["defaults"]["thresholds"]["steps"]
            self.assertEqual(steps[0]["color"], "green")
            self.assertEqual([s["color"] for s in steps if s["value"] is not None], ["red"])
            self.assertTrue(0 < steps[-1]["value"] <= 1)

    def test_alerts_structure(self) -> None:
        with open(ALERTS) as f:
            rules = yaml.safe_load(f)
        alerts = alert_rules(rules)
        names = [a["alert"] for a in alerts]
        self.assertEqual(len(names), len(set(names)))
        self.assertLessEqual(
            {"NidstateShadowMismatch", "NidstateMirrorWriteFailures", "NidstateMigrationStuck"},
            set(names),
        )
        for alert in alerts:
            name = alert["alert"]
            self.assertLessEqual(
                set(alert), {"alert", "expr", "for", "labels", "annotations"}, name
            )
            self.assertIn(alert["labels"]["severity"], ("critical", "warning", "info"), name)
            self.assertTrue(alert["annotations"]["summary"], name)
            description = alert["annotations"]["description"]
            self.assertIn("synapse-nidstate", description, name)
            if "for" in alert:
                self.assertRegex(alert["for"], r"^\d+[smh]$", name)
            parse_promql(alert["expr"])
        by_name = {a["alert"]: a for a in alerts}
        for name in ("NidstateShadowMismatch", "NidstateMirrorWriteFailures"):
            self.assertIn(
                "synapse-nidstate verify -c homeserver.yaml",
                by_name[name]["annotations"]["description"],
            )
