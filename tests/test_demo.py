"""The demo, the README's main job, run as an operator runs it (small sizes)."""

import os
import subprocess
import sys

from twisted.trial import unittest

from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    create_postgres_database,
    drop_postgres_database,
    postgres_available,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--rooms", "3", "--events", "260", "--big-room-members", "25",
    "--small-room-members", "4", "--timing-events", "5", "--no-progress",
]


def run_demo(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synapse_nidstate.cli", "demo", *SMALL, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


class DemoTests(unittest.TestCase):
    timeout = 600

    def check(self, result: subprocess.CompletedProcess) -> None:
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertIn("RESULT: OK, the mirror equals Synapse's state", result.stdout)
        self.assertIn(" 0 mismatches, 0 not mirrored, 0 orphan rows", result.stdout)
        self.assertIn("1/4 wrote", result.stdout)
        self.assertRegex(result.stdout, r"2/4 migrated [1-9][0-9]* events")
        self.assertIn("bytes per state entry", result.stdout)
        for lookup in ("full state", "one member key", "lazy-load members", "batch of"):
            self.assertIn(lookup, result.stdout)

    def test_demo_on_sqlite(self) -> None:
        self.check(run_demo())

    def test_demo_on_postgres(self) -> None:
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL is required in CI: {problem}")
            raise unittest.SkipTest(problem)
        name = create_postgres_database()
        self.addCleanup(drop_postgres_database, name)
        dsn = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={name}"
        result = run_demo("--postgres", dsn)
        self.check(result)
        self.assertIn("on PostgreSQL", result.stdout)

    def test_bad_options(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "synapse_nidstate.cli", "demo", "--events", "0"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("--events must be at least 1", result.stderr)
