"""The benchmark runner's smoke run (tiny scale): both paths must give equal answers.

Timings are not asserted here (the benchmark reports them); only that the
runner runs end to end from the command line, on both engines, and that the
mirror's answers equal Synapse's on every event it timed.
"""

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.harness import PG_HOST, PG_PORT, PG_USER, drop_postgres_database, postgres_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchmarkSmokeTests(unittest.TestCase):
    timeout = 600

    def run_benchmark(self, *extra: str) -> dict:
        work = tempfile.mkdtemp(prefix="nidstate-bench-")
        out = os.path.join(work, "result.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--scale", "tiny", "--no-progress",
             "--data", os.path.join(work, "data"), "--json", out, *extra],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for heading in ("## Storage", "## State-at-event lookups", "## Database work",
                        "## Persistence", "## A realistic mix", "## Migration",
                        "## Cache memory", "## Targets"):
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
        mix = figures["realistic_mix"]
        self.assertEqual(mix["requests"]["value"], 30)
        self.assertEqual(mix["mismatches"]["value"], 0)
        self.assertGreater(mix["lookups"]["value"], 30)
        self.assertIn("realistic mix throughput >= 3x, from cold", {t["target"] for t in figures["targets"]})
        return figures

    def test_sqlite(self) -> None:
        figures = self.run_benchmark()
        self.assertEqual(figures["engine"], "sqlite")

    def test_postgres(self) -> None:
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL is required in CI: {problem}")
            raise unittest.SkipTest(problem)
        name = f"nidstate_bench_test_{os.getpid()}"
        self.addCleanup(drop_postgres_database, name)
        figures = self.run_benchmark(
            "--engine", "postgres", "--database-name", name,
            "--postgres", f"host={PG_HOST} port={PG_PORT} user={PG_USER}",
        )
        self.assertEqual(figures["engine"], "postgres")
        self.assertEqual(figures["storage"]["engines"]["main"], "postgres")
