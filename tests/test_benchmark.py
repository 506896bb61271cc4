"""The benchmark runner's smoke run (tiny scale): both paths must give equal answers.

Timings are not asserted here (the benchmark reports them); only that the
runner runs end to end from the command line, on both engines, and that the
mirror's answers equal Synapse's on every event it timed.
"""

import json
import os
import subprocess
import sys

import yaml
from twisted.trial import unittest

from synapse_nidstate.demo.inprocess import homeserver_config, sqlite_database
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    drop_postgres_database,
    postgres_available,
    temporary_directory,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchmarkSmokeTests(unittest.TestCase):
    timeout = 600

    def setUp(self) -> None:
        self.work = temporary_directory(self, "nidstate-bench-")

    def postgres_args(self) -> list[str]:
        """The runner's PostgreSQL arguments, with a database dropped after the test."""
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL is required in CI: {problem}")
            raise unittest.SkipTest(problem)
        name = f"nidstate_bench_test_{os.getpid()}"
        self.addCleanup(drop_postgres_database, name)
        return ["--engine", "postgres", "--database-name", name,
                "--postgres", f"host={PG_HOST} port={PG_PORT} user={PG_USER}"]

    def run_benchmark(self, data: str, *extra: str) -> dict:
        out = os.path.join(self.work, "result.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--scale", "tiny", "--no-progress",
             "--data", os.path.join(self.work, data), "--json", out, *extra],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for heading in ("## Storage", "## State-at-event lookups", "## Database work",
                        "## Persistence", "## A realistic mix", "## Migration",
                        "## Cache memory", "## Process memory", "## Targets"):
            self.assertIn(heading, result.stdout)
        with open(out) as f:
            figures = json.load(f)
        equality = figures["equality"]
        self.assertEqual(equality["mismatches"], 0)
        self.assertEqual(equality["not_mirrored"], 0)
        self.assertGreater(equality["answers"], 0)
        self.assertEqual(
            {(t["lookup"], t["caches"]) for t in figures["lookups"]},
            {(name, cache) for cache in ("cold", "warm") for name in
             ("full state", "one member key", "lazy-load members", "batch of 10 events",
              "state group: full state", "state group: one member key",
              "state group: lazy-load members", "state group delta")},
        )
        self.assertGreater(figures["migration"]["events"]["value"], 0)
        self.assertIn("blocks_given_strings", figures["migration"])
        mix = figures["realistic_mix"]
        self.assertEqual(mix["requests"]["value"], 30)
        self.assertEqual(mix["mismatches"]["value"], 0)
        self.assertGreater(mix["lookups"]["value"], 30)
        self.assertIn("realistic mix >= 3x, from cold", {t["target"] for t in figures["targets"]})
        # With the module serving, Synapse kept no group the module answered.
        serving = figures["synapse_group_caches_while_serving"]
        self.assertEqual(set(serving), {"state_group_cache", "state_group_members_cache"})
        self.assertEqual([c["entries"]["value"] for c in serving.values()], [0, 0])
        # The mix in a process of its own, Synapse alone and with the module:
        # the same answers, and the resident memory of each.
        process = figures["process_memory"]
        self.assertEqual(set(process), {"native", "nid"})
        self.assertEqual(process["native"]["digest"], process["nid"]["digest"])
        for side in process.values():
            self.assertGreater(side["rss_after"]["value"], 0)
            self.assertGreater(side["malloc_after"]["in_use"]["value"], 0)
            self.assertEqual(side["requests"]["value"], 30)
        self.assertIn("process RSS after the mix lower with the module",
                      {t["target"] for t in figures["targets"]})
        return figures

    def test_sqlite(self) -> None:
        figures = self.run_benchmark("sqlite")
        self.assertEqual(figures["engine"], "sqlite")
        self.profile_homeserver(os.path.join(self.work, "sqlite"))
        self.trace_mix_memory(
            os.path.join(self.work, "sqlite"), figures["process_memory"]["nid"]["digest"]
        )

    def trace_mix_memory(self, data_dir: str, runner_digest: str) -> None:
        """``benchmarks.mix --trace-memory`` with the module: where what the replay
        left behind was allocated, and every state cache's entries. The trace
        is drawn in the process here; the runner's processes replayed it from
        the file another process drew (``--write-trace``, ``--trace``): the
        same requests, so the same answers."""
        out = os.path.join(self.work, "mix-traced.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.mix", "--homeserver-config",
             os.path.join(data_dir, "homeserver-nid.yaml"), "--requests", "30", "--json", out,
             "--trace-memory"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
        with open(out) as f:
            traced = json.load(f)
        self.assertTrue(any(site["file"].startswith("synapse_nidstate/")
                            for site in traced["traced_growth"]), traced["traced_growth"])
        self.assertEqual(traced["digest"], runner_digest)
        # Each request kind's traced peak, the three kinds of the mix.
        self.assertEqual(set(traced["request_peaks"]), {"/messages", "/context", "initial sync"})
        for peak in traced["request_peaks"].values():
            self.assertGreater(peak["requests"], 0)
            self.assertLessEqual(peak["p50"], peak["max"])
        self.assertGreater(traced["traced_after"], 0)
        # glibc's own account (this machine's C library is glibc): what it
        # holds is what is in use and what it keeps freed.
        allocator = traced["malloc_after"]
        self.assertGreater(allocator["in_use"], 0)
        self.assertGreaterEqual(allocator["heap"], allocator["in_use"])
        self.assertRegex(result.stdout, r"glibc's allocator after the replay \(MiB\): heap ")
        # No state of 10,000 entries here: the module had nothing to release.
        self.assertEqual(traced["freed_memory_releases"], {"releases": 0, "seconds": 0.0})
        entries = traced["cache_entries"]
        self.assertGreater(entries["nidstate_blocks"], 0)
        self.assertEqual(entries["state_group_members_cache"], 0)  # the module answered
        # A snapshot is one node, whatever keys its parts hold (the
        # mix's lazy-loading reads ask several members of a snapshot).
        nodes = traced["cache_nodes"]
        self.assertGreater(nodes["nidstate_snapshot_parts"], 0)
        self.assertLess(nodes["nidstate_snapshot_parts"], entries["nidstate_snapshot_parts"])
        self.assertRegex(result.stdout, r"entries +[0-9,]+ nodes  nidstate_blocks")

    def profile_homeserver(self, data_dir: str) -> None:
        """``benchmarks.profile --homeserver-config`` (how the HQ-scale data is
        profiled) on the run's database, through a homeserver.yaml with the module."""
        with open(os.path.join(data_dir, "dataset.json")) as f:
            room_id = json.load(f)["writer"]["rooms"][0]
        config_path = os.path.join(data_dir, "homeserver.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(
                homeserver_config(data_dir, sqlite_database(data_dir), {"mode": "serve"}), f
            )
        # State at events from cold; state groups warm (the module's caches
        # standing in for Synapse's, against Synapse's own caches).
        for lookup, path, reader, warm in (
            ("full", "nid", "state_for_events_txn", []),
            ("full", "native", "get_state_for_groups", []),
            ("group-member", "nid", "cached_state_for_groups", ["--warm"]),
            ("group-member", "native", "_get_state_for_group_using_cache", ["--warm"]),
        ):
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.profile", "--homeserver-config", config_path,
                 "--room", room_id, "--lookup", lookup, "--events", "3", "--path", path,
                 "--top", "60", *warm],
                cwd=REPO, capture_output=True, text=True, timeout=300,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
            self.assertIn(f"{lookup} lookups, {path}", result.stdout)
            self.assertIn(reader, result.stdout)
        # The whole reads' time and peak, each regime's answers as Synapse's.
        out = os.path.join(self.work, "whole-read.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.whole_read", "--homeserver-config", config_path,
             "--room", room_id, "--events", "2", "--json", out],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
        with open(out) as f:
            reads = json.load(f)["reads"]
        self.assertEqual(list(reads), ["native", "nid cold", "nid blocks kept"])
        for regime, figures in reads.items():
            self.assertIn(regime, result.stdout)
            self.assertEqual(len(figures), 2)
            for read in figures:
                self.assertGreater(read["ms"], 0)
                self.assertGreater(read["peak_mib"], 0)
                self.assertGreater(read["entries"], 0)
        # What the resolved-state cache keeps for the room's latest groups.
        out = os.path.join(self.work, "resolved-cache.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.resolved_cache", "--homeserver-config",
             config_path, "--room", room_id, "--groups", "5", "--order", "newest", "--json", out],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
        with open(out) as f:
            kept = json.load(f)
        self.assertIn("read newest", result.stdout)
        self.assertGreaterEqual(kept["bases"], 1)
        self.assertEqual(kept["bases"] + kept["changes"], kept["cache_entries"])
        self.assertGreater(kept["bytes"], 0)

    def test_postgres(self) -> None:
        figures = self.run_benchmark("postgres", *self.postgres_args())
        self.assertEqual(figures["engine"], "postgres")
        self.assertEqual(figures["storage"]["engines"]["main"], "postgres")
        self.assertIsNone(figures["dataset"]["ported_from"])

    def test_postgres_ported_from_sqlite(self) -> None:
        """--port-from: the SQLite dataset, ported by Synapse's synapse_port_db, serves
        a PostgreSQL run; its history is the SQLite one plus the run's own sends."""
        postgres = self.postgres_args()
        on_sqlite = self.run_benchmark("sqlite")["dataset"]
        on_postgres = self.run_benchmark("postgres", *postgres,
                                         "--port-from", os.path.join(self.work, "sqlite"))
        self.assertEqual(on_postgres["engine"], "postgres")
        dataset = on_postgres["dataset"]
        self.assertEqual(dataset["ported_from"], os.path.join(self.work, "sqlite"))
        self.assertGreater(dataset["port_seconds"], 0)
        self.assertEqual(dataset["rooms"], on_sqlite["rooms"])
        self.assertGreater(dataset["events"], on_sqlite["events"])
        self.assertGreater(dataset["state_groups"], on_sqlite["state_groups"])


class LiveSmokeTests(unittest.TestCase):
    """``benchmarks.live`` at tiny scale: a real Synapse process under traffic, the
    job killed with SIGKILL and restarted, then verify (PostgreSQL only: the
    benchmark copies databases with ``CREATE DATABASE ... TEMPLATE``)."""

    timeout = 900

    def test_live(self) -> None:
        work = temporary_directory(self, "nidstate-live-")
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL is required in CI: {problem}")
            raise unittest.SkipTest(problem)
        name = f"nidstate_live_test_{os.getpid()}"
        self.addCleanup(drop_postgres_database, name)
        self.addCleanup(drop_postgres_database, f"{name}_live")
        out = os.path.join(work, "live.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.live", "--scale", "tiny", "--seconds", "8",
             "--warm-up", "1", "--catch-up", "30", "--configs", "serve,kill", "--breakdown",
             "--database-name", name, "--postgres", f"host={PG_HOST} port={PG_PORT} user={PG_USER}",
             "--data", os.path.join(work, "data"), "--json", out],
            cwd=REPO, capture_output=True, text=True, timeout=800,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
        with open(out) as f:
            serve, kill = json.load(f)["results"]
        self.assertEqual(serve["traffic"]["failed"], 0)
        for kind in ("message", "state", "reads"):
            self.assertGreater(serve["traffic"][kind]["n"], 0, kind)
        self.assertEqual(serve["reclaimed_at_end"], 0)  # no reclaim configured
        self.assertGreater(serve["rss_mib"]["peak"], 0)
        # --breakdown read Synapse's request and transaction log lines and the
        # metrics listener: the messages' CPU, the persistence transactions,
        # the process's CPU and the module's write timer.
        breakdown = serve["breakdown"]
        self.assertGreater(breakdown["requests"]["message"]["n"], 0)
        self.assertGreater(breakdown["requests"]["message"]["cpu_ms"], 0)
        self.assertGreater(breakdown["transactions"]["persist_events"]["n"], 0)
        self.assertGreater(breakdown["metrics"]["process_cpu_seconds_total"], 0)
        self.assertGreater(breakdown["metrics"]["synapse_nidstate_mirror_write_seconds_count"], 0)
        self.assertNotIn("metrics", kill["breakdown"])  # the process restarted
        self.assertIn("Per request", result.stdout)
        # The job reclaimed the history, the process was killed and came back, and
        # every event's state still equals Synapse's.
        self.assertIsNotNone(kill["killed"])
        self.assertGreaterEqual(kill["reclaimed_at_end"], kill["history_groups"] // 2)
        self.assertEqual(kill["verify"]["exit_code"], 0, kill["verify"]["output"])
        self.assertIn("mismatches: 0", kill["verify"]["output"])
        self.assertIn("| kill |", result.stdout)
