"""`reclaim` and `restore` as an operator runs them: killed with SIGKILL half-way
and run again; Synapse without the module, and ``synapse_port_db``, refuse the
database while groups are reclaimed; after restore Synapse alone answers
every event and every state group as before reclaim, with no more rows."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any

import yaml

from synapse_nidstate.demo.inprocess import homeserver_config
from tests.harness import PG_HOST, PG_PORT, PG_USER, HomeserverTestCase, in_logcontext
from tests.scenarios import build_history
from tests.test_cli import REPO, CliTestCase, run_cli, write_config
from tests.test_reclaim import SERVE, event_digest, native_group_digest

#: Refusal of a database "too new" for the Synapse that opens it.
TOO_NEW = "Cannot use this database as it is too new for the server to understand"


def sqlite_count(path: str, sql: str) -> int:
    with sqlite3.connect(path, timeout=30) as conn:
        return int(conn.execute(sql).fetchone()[0])


def kill_when(
    args: list[str], path: str, sql: str, at_least: int, timeout: float = 300
) -> subprocess.Popen:
    """Start the CLI; SIGKILL it once ``sql`` counts ``at_least`` on the database."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "synapse_nidstate.cli", *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if sqlite_count(path, sql) >= at_least:
                break
        except sqlite3.OperationalError:
            pass  # locked, or the table is not there yet
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


class ReclaimCliTests(HomeserverTestCase, CliTestCase):
    engine = "sqlite"

    def write_yaml(self, data_dir: str, database: dict[str, Any], module: Any) -> str:
        path = os.path.join(data_dir, "homeserver.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(homeserver_config(data_dir, database, module), f)
        return path

    @in_logcontext
    async def test_reclaim_and_restore_killed_half_way(self) -> None:
        database = self.database_config()
        path = database["args"]["database"]
        hs = await self.make_homeserver(SERVE, database=database)
        history = await build_history(hs, messages_per_room=8)
        events_before = await event_digest(hs, history.rooms)
        groups_before = await native_group_digest(hs)
        await self.stop_homeserver(hs)
        rows_before = sqlite_count(path, "SELECT COUNT(*) FROM state_groups_state")
        config = write_config(self.tmpdir(), database)
        reclaimed = "SELECT COUNT(*) FROM nidstate_reclaimed_groups"

        # The dry run says how much would come back, where, and how long it takes.
        def table_bytes() -> int:
            stats = run_cli("stats", "-c", config, "--json")
            self.assertEqual(stats.returncode, 0, stats.stderr)
            return json.loads(stats.stdout)["synapse"]["tables"]["state_groups_state"]["total_bytes"]

        dry = run_cli("reclaim", "-c", config, "--dry-run", "--no-progress")
        self.assertEqual(dry.returncode, 0, dry.stdout + dry.stderr)
        self.assertIn("the rooms with the most rows to give back", dry.stdout)
        self.assertIn(history.rooms[0], dry.stdout)
        self.assertRegex(dry.stdout, r"the proof took [0-9.]+s \([0-9,]+ groups/s\)")
        estimate = re.search(r"it would give back about ([0-9.]+) (B|KiB|MiB)", dry.stdout)
        assert estimate is not None, dry.stdout
        estimated = float(estimate.group(1)) * {"B": 1, "KiB": 1024, "MiB": 1024**2}[estimate.group(2)]
        bytes_before = table_bytes()

        # Killed half-way, then run again to the end.
        proc = kill_when(
            ["reclaim", "-c", config, "--batch-size", "1", "--no-progress"],
            path, reclaimed, len(groups_before) // 3,
        )
        self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stdout.read() if proc.stdout else "")
        half = sqlite_count(path, reclaimed)
        self.assertGreater(half, 0)
        self.assertLess(half, len(groups_before))
        # Every group is either reclaimed (no rows) or untouched.
        self.assertEqual(
            sqlite_count(
                path,
                "SELECT COUNT(*) FROM nidstate_reclaimed_groups AS r"
                " JOIN state_groups_state AS s ON s.state_group = r.state_group",
            ),
            0,
        )
        result = run_cli("reclaim", "-c", config, "--no-progress")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # What came back once SQLite gives the pages up (VACUUM, Synapse stopped):
        # the dry run's estimate within a factor of two.
        with sqlite3.connect(path) as conn:
            conn.execute("VACUUM")
        given_back = bytes_before - table_bytes()
        self.assertGreater(given_back, estimated / 2)
        self.assertLess(given_back, estimated * 2)
        self.assertRegex(result.stdout, r"^reclaimed [0-9,]+ state groups? \([0-9,]+ rows? of")
        self.assertNotIn("kept their rows", result.stdout)  # said only when some did
        rows_reclaimed = sqlite_count(path, "SELECT COUNT(*) FROM state_groups_state")
        self.assertLess(rows_reclaimed, 0.2 * rows_before)
        verify = run_cli("verify", "-c", config, "--no-progress")
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)
        self.assertIn("mismatches: 0", verify.stdout)
        stats = run_cli("stats", "-c", config)
        self.assertEqual(stats.returncode, 0, stats.stdout + stats.stderr)
        self.assertIn("reclaimed", stats.stdout)

        # drop refuses: the NID tables are the only copy of the reclaimed state.
        drop = run_cli("drop", "-c", config, "--yes")
        self.assertEqual(drop.returncode, 1, drop.stdout + drop.stderr)
        self.assertIn("Run `synapse-nidstate restore` first", drop.stderr)

        # Synapse without the module refuses to start on the database.
        bare_dir = self.tmpdir()
        bare = self.write_yaml(bare_dir, database, None)
        started = subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", bare],
            cwd=bare_dir, capture_output=True, text=True, timeout=300,
            stdin=subprocess.DEVNULL,
        )
        self.assertNotEqual(started.returncode, 0)
        self.assertIn(TOO_NEW, started.stdout + started.stderr)
        # ... and so does synapse_port_db, which would copy only Synapse's tables.
        self.require_postgres()
        pg_config = self.write_yaml(
            self.tmpdir(),
            {
                "name": "psycopg2",
                "args": {
                    "host": PG_HOST, "port": PG_PORT, "user": PG_USER,
                    "database": self.postgres_database_name(),
                },
            },
            None,
        )
        port = subprocess.run(
            [
                sys.executable, "-m", "synapse._scripts.synapse_port_db",
                "--sqlite-database", path, "--postgres-config", pg_config,
            ],
            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )
        self.assertIn(TOO_NEW, port.stdout + port.stderr)

        # Restore, killed half-way too, then to the end.
        total = sqlite_count(path, reclaimed)
        proc = kill_when(
            ["restore", "-c", config, "--batch-size", "1", "--no-progress"],
            path, f"SELECT {total} - COUNT(*) FROM nidstate_reclaimed_groups", total // 2,
        )
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        result = run_cli("restore", "-c", config, "--no-progress")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("no group is reclaimed any more", result.stdout)
        self.assertLessEqual(
            sqlite_count(path, "SELECT COUNT(*) FROM state_groups_state"), rows_before
        )

        # Synapse alone: every event and every group as before reclaim.
        hs = await self.make_homeserver(None, database=database)
        self.assertEqual(await native_group_digest(hs), groups_before)
        self.assertEqual(await event_digest(hs, history.rooms), events_before)
