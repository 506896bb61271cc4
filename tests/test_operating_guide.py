"""docs/operating.md, tried as written (scripts/operating_guide.py) on a real
Synapse process: on SQLite, on PostgreSQL, and on PostgreSQL with an event
persister worker (Redis)."""

import os
import subprocess
import sys

from twisted.trial import unittest

from tests.harness import PG_HOST, PG_PORT, PG_USER, postgres_available
from tests.test_workers import redis_available

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "operating_guide.py")


class OperatingGuideTests(unittest.TestCase):
    timeout = 900

    def guide(self, *args: str) -> None:
        result = subprocess.run(
            [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=850,
            stdin=subprocess.DEVNULL,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output[-5000:])
        self.assertIn("the guide ran as written", result.stdout)
        self.assertIn("step 30", result.stdout)  # every step of the guide ran

    def test_sqlite(self) -> None:
        self.guide()

    def require(self, *problems: str | None) -> None:
        for problem in problems:
            if problem is not None:
                if os.environ.get("CI"):
                    self.fail(f"required in CI: {problem}")
                raise unittest.SkipTest(problem)

    def test_postgres(self) -> None:
        self.require(postgres_available())
        self.guide("--postgres", f"host={PG_HOST} port={PG_PORT} user={PG_USER}")

    def test_postgres_workers(self) -> None:
        # Every event is persisted (so mirrored) by the worker: the script checks it.
        self.require(postgres_available(), redis_available())
        self.guide("--postgres", f"host={PG_HOST} port={PG_PORT} user={PG_USER}", "--workers")
