"""Migrating history written by a real Synapse with the module off: in-process and by the CLI."""

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import yaml
from synapse.server import HomeServer
from synapse.storage.databases.state import store as synapse_state_store
from synapse.types.state import StateFilter
from synapse.util.duration import Duration
from twisted.trial import unittest

from synapse_nidstate.algebra import unpack_nids
from synapse_nidstate.commands import verify
from synapse_nidstate.commands.verify import (
    compare_with_native,
    find_orphans,
    next_batch_size,
    room_events_with_state,
    standard_filters,
)
from synapse_nidstate.demo.history import Driver, HistoryShape, realistic_history
from synapse_nidstate.demo.inprocess import homeserver_config
from synapse_nidstate.storage import KnownStates
from synapse_nidstate.storage.schema import TABLES
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    HomeserverTestCase,
    create_postgres_database,
    drop_postgres_database,
    in_logcontext,
    temporary_directory,
)
from tests.scenarios import build_history, compare_room, filters_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def table_rows(hs: HomeServer) -> dict[str, int]:
    def count_txn(txn: Any) -> dict[str, int]:
        counts = {}
        for table in TABLES:
            txn.execute(f"SELECT COUNT(*) FROM {table}")
            counts[table] = txn.fetchone()[0]
        return counts

    return await hs.get_datastores().main.db_pool.runInteraction("test_rows", count_txn)


class MigrateTests:
    @in_logcontext
    async def test_migrate_history_beside_the_live_mirror(self) -> None:
        database = self.database_config()
        hs = await self.make_homeserver(None, database=database)
        history = await build_history(hs)
        await self.stop_homeserver(hs)

        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        module = self.module(hs)
        module.migrator.batch_size = 7
        self.assertGreater(await module.migrator.remaining(), 30)
        d = Driver(hs)
        alice = history.users[0]
        # Migrate a batch at a time while Synapse keeps persisting events.
        until = await module.migrator.last_stream_ordering()
        sent = 0
        while await module.migrator.run_batch(until):
            await d.message(alice, history.rooms[0], f"during migration {sent}")
            sent += 1
        self.assertGreater(sent, 5)
        self.assertEqual(await module.migrator.remaining(), 0)
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)
        orphans = await find_orphans(hs)
        self.assertEqual(orphans.count, 0)

        # A second run finds nothing to do and writes nothing.
        # (It scans the events persisted during the first run, which the live
        # mirror covered: they count as covered, and nothing is written.)
        before = await table_rows(hs)
        await module.migrator.run()
        self.assertTrue(module.migrator.progress.finished)
        self.assertEqual(await table_rows(hs), before)

        # Events persisted while the module is disabled are a gap the next
        # migration finds (they come after the range already done).
        await self.stop_homeserver(hs)
        hs = await self.make_homeserver(None, database=database)
        d = Driver(hs)
        # A state change first: the messages after it share its new state group,
        # which the mirror has no snapshot for (messages sent in the group the
        # mirror already has would be answered at once: see test_mirror).
        topic = await d.send(alice, history.rooms[1], "m.room.topic", {"topic": "disabled"}, "")
        gap = [topic.event_id]
        gap += [(await d.message(alice, history.rooms[1], f"while disabled {i}")).event_id
                for i in range(5)]
        await self.stop_homeserver(hs)
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        module = self.module(hs)
        self.assertEqual(await module.migrator.remaining(), 6)
        self.assertEqual((await module.migration_status())["remaining_events"], 6)
        # Until migrated, the gap's lookups fall back to Synapse, with its answers.
        self.assertEqual(await module.lookups.mirrored_state_ids(gap, StateFilter.all()), {})
        fallback = module.stats.lookups.fallback
        controller = hs.get_storage_controllers().state
        self.assertEqual(
            await controller.get_state_ids_for_events(gap),
            await module.lookups.native_state_ids(gap, StateFilter.all()),
        )
        self.assertEqual(module.stats.lookups.fallback - fallback, len(gap))
        await module.migrator.run()
        self.assertEqual(await module.migrator.remaining(), 0)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)

        # verify's batches follow the size of the state: with a budget of one
        # state entry, every batch after the first holds one event, and every
        # event is still compared.
        self.patch(verify, "ENTRY_BUDGET", 1)  # type: ignore[attr-defined]
        events = [e for room in history.rooms for e in await room_events_with_state(hs, room)]
        sizes: list[int] = []
        result = await compare_with_native(
            module.lookups, events, standard_filters(history.users[:1]), sizes.append
        )
        self.assertEqual((result.events, result.mismatches, result.unmirrored), (len(events), [], 0))
        self.assertEqual(sizes, [verify.FIRST_BATCH] + [1] * (len(events) - verify.FIRST_BATCH))

    @in_logcontext
    async def test_full_copies_built_on_the_group_before(self) -> None:
        # Synapse stores a group in full once its delta chain is
        # MAX_STATE_DELTA_HOPS long (100; 4 here, so that a short history has
        # many). The migration reads each full copy, and stores it as the
        # snapshot of the group before it (a prev event's) plus the difference.
        self.patch(synapse_state_store, "MAX_STATE_DELTA_HOPS", 4)
        database = self.database_config()
        hs = await self.make_homeserver(None, database=database)
        history = await build_history(hs)
        d = Driver(hs)
        alice = history.users[0]
        for i in range(12):
            await d.send(alice, history.rooms[0], "m.room.topic", {"topic": f"topic {i}"}, "")
        await self.stop_homeserver(hs)

        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        module = self.module(hs)
        module.migrator.batch_size = 5  # bases in earlier batches and in the same one
        await module.migrator.run()
        self.assertEqual(await module.migrator.remaining(), 0)
        stats = module.stats.mirror
        self.assertGreaterEqual(stats.full_states_rebased, 4)
        # Those full copies were read as their difference, not whole.
        self.assertGreaterEqual(stats.full_states_by_difference, 4)
        # Every room's first group has no group before it.
        self.assertEqual(stats.full_state_reads - stats.full_states_rebased, len(history.rooms))
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters_for(hs, history.users))

        # A full copy's snapshot is the snapshot of a group before it plus
        # one block: its block list extends that one's.
        def lists_txn(txn: Any) -> list[tuple[int, bytes, bool]]:
            txn.execute(
                "SELECT g.state_group, s.block_nids, e.state_group IS NULL"
                " FROM nidstate_state_groups AS g"
                " JOIN nidstate_snapshots AS s ON s.snapshot_nid = g.snapshot_nid"
                " LEFT JOIN state_group_edges AS e ON e.state_group = g.state_group"
            )
            return txn.fetchall()

        rows = await hs.get_datastores().main.db_pool.runInteraction("test_lists", lists_txn)
        lists = {group: unpack_nids(bytes(data)) for group, data, _ in rows}
        extended = 0
        for group, _, full_copy in rows:
            if full_copy and any(
                len(other) < len(lists[group]) and lists[group][: len(other)] == other
                for other in lists.values()
            ):
                extended += 1
        self.assertGreaterEqual(extended, 4)

    @in_logcontext
    async def test_a_group_read_as_its_difference_from_another(self) -> None:
        # difference_txn against Synapse's own reads, for every pair of a
        # room's groups: the change where it is a delta, None where the later
        # state lacks a key of the other's (a removal is not a delta).
        self.patch(synapse_state_store, "MAX_STATE_DELTA_HOPS", 4)
        hs = await self.make_homeserver({"mode": "serve", "reclaim": {}})
        history = await build_history(hs)
        module = self.module(hs)
        pool = hs.get_datastores().main.db_pool
        state_store = hs.get_datastores().state

        def groups_txn(txn: Any) -> list[int]:
            txn.execute(
                "SELECT id FROM state_groups WHERE room_id = ? ORDER BY id", (history.rooms[0],)
            )
            return [row[0] for row in txn.fetchall()]

        groups = await pool.runInteraction("test_groups", groups_txn)
        states = await state_store._get_state_for_groups(groups)
        checked = removals = 0
        for group in groups[-12:]:
            for base in groups[-24:]:
                got = await pool.runInteraction(
                    "test_difference", module.store.difference_txn, group, base, True
                )
                if states[base].keys() - states[group].keys():
                    self.assertIsNone(got, (group, base))
                    removals += 1
                    continue
                expected = {k: v for k, v in states[group].items() if states[base].get(k) != v}
                self.assertEqual(got, expected, (group, base))
                checked += 1
        self.assertGreater(checked, 100)
        self.assertGreater(removals, 0)

        # The same answers with the states of full copies kept between calls,
        # as a migration run keeps them: a kept group's rows are not read
        # again, and what is kept is Synapse's state of the group.
        read: list[set[int]] = []
        group_rows_txn = module.store.group_rows_txn

        def counting(txn: Any, wanted: Any) -> Any:
            read.append(set(wanted))
            return group_rows_txn(txn, wanted)

        self.patch(module.store, "group_rows_txn", counting)
        known = KnownStates(10**9)
        for group in groups[-12:]:
            for base in groups[-24:]:
                before = set(known)
                got = await pool.runInteraction(
                    "test_difference", module.store.difference_txn, group, base, True, known
                )
                self.assertFalse(read[-1] & before, (group, base))
                if states[base].keys() - states[group].keys():
                    self.assertIsNone(got, (group, base))
                    continue
                expected = {k: v for k, v in states[group].items() if states[base].get(k) != v}
                self.assertEqual(got, expected, (group, base))
        self.assertGreaterEqual(len(known), 2)
        for group, state in known.items():
            self.assertEqual(state, states[group], group)
        kept_reads = sum(map(len, read))
        # Bounded: the oldest out first, the newest kept whatever its size.
        bounded = KnownStates(1)
        for group, state in known.items():
            bounded.add(group, state)
        self.assertEqual(list(bounded), [list(known)[-1]])
        read.clear()
        for group in groups[-12:]:
            for base in groups[-24:]:
                await pool.runInteraction(
                    "test_difference", module.store.difference_txn, group, base, True
                )
        self.assertLess(kept_reads, sum(map(len, read)))

        # A chain through a reclaimed group (its rows deleted) is no difference.
        from_first = {
            group: await pool.runInteraction(
                "test_difference", module.store.difference_txn, group, groups[0], True
            )
            for group in groups
        }
        self.assertGreater((await module.reclaimer.run()).groups, 0)

        def reclaimed_txn(txn: Any) -> int:
            txn.execute("SELECT MAX(state_group) FROM nidstate_reclaimed_groups")
            return txn.fetchone()[0]

        reclaimed = await pool.runInteraction("test_reclaimed", reclaimed_txn)
        self.assertIsNotNone(from_first[reclaimed])
        got = await pool.runInteraction(
            "test_difference", module.store.difference_txn, reclaimed, groups[0], True
        )
        self.assertIsNone(got)

    @in_logcontext
    async def test_background_migration(self) -> None:
        database = self.database_config()
        hs = await self.make_homeserver(None, database=database)
        history = await build_history(hs)
        await self.stop_homeserver(hs)
        hs = await self.make_homeserver(
            {
                "mode": "serve",
                "background_migration": {"enabled": True, "batch_size": 10, "interval_ms": 20},
            },
            database=database,
        )
        module = self.module(hs)
        self.assertTrue(module.migrates_in_background)
        clock = hs.get_clock()
        for _ in range(500):
            if await module.migrator.remaining() == 0:
                break
            await clock.sleep(Duration(milliseconds=50))
        status = await module.migration_status()
        self.assertEqual(status["remaining_events"], 0, status)
        self.assertGreater(status["events_migrated_here"], 0, status)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters_for(hs, history.users))


class VerifyBatchTests(unittest.TestCase):
    def test_batches_fit_the_entry_budget(self) -> None:
        budget, most = verify.ENTRY_BUDGET, verify.BATCH
        self.assertEqual(next_batch_size(64, 200), most)  # small rooms: full batches
        self.assertEqual(next_batch_size(10, 200), 20)  # growing: twice the last
        # One big state in a batch sizes the next by it, whatever the others held.
        self.assertEqual(next_batch_size(100, 48_000), budget // 48_000)
        self.assertEqual(next_batch_size(1, budget * 5), 1)  # never none
        self.assertEqual(next_batch_size(0, 0), 1)


class SqliteMigrateTests(MigrateTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresMigrateTests(MigrateTests, HomeserverTestCase):
    engine = "postgres"


def _cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synapse_nidstate.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


class CliTests:
    """The `synapse-nidstate` commands, run as processes on a homeserver.yaml."""

    def write_config(self, database: dict[str, Any]) -> str:
        data_dir = temporary_directory(self, "nidstate-cli-")
        config = homeserver_config(data_dir, database, {"mode": "serve"})
        path = os.path.join(data_dir, "homeserver.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path

    def copy_database(self, database: dict[str, Any]) -> dict[str, Any]:
        """An identical copy of a database (its state right now)."""
        copy = {**database, "args": dict(database["args"])}
        if self.engine == "sqlite":
            target = os.path.join(temporary_directory(self, "nidstate-copy-"), "homeserver.db")
            shutil.copy(database["args"]["database"], target)
            copy["args"]["database"] = target
            return copy
        import psycopg2

        name = create_postgres_database()
        drop_postgres_database(name)
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {database['args']['database']}")
        conn.close()
        self.addCleanup(drop_postgres_database, name)
        copy["args"]["database"] = name
        return copy

    @in_logcontext
    async def test_kill_9_during_migrate_then_rerun(self) -> None:
        """Ctrl-C (SIGINT) half-way: a message and exit 130, no traceback; then
        kill -9 further on; the rerun finishes and every answer agrees."""
        database = self.database_config()
        hs = await self.make_homeserver(None, database=database)
        await realistic_history(
            hs, HistoryShape(rooms=5, big_room_members=30, small_room_members=6, events=900)
        )
        await self.stop_homeserver(hs)
        uninterrupted = self.copy_database(database)

        config = self.write_config(database)
        # Small batches: this history migrates in about a second with the
        # default size, and a signal that lands after the last batch finds the
        # process exiting (Python's handlers already reset: -2, not 130).
        args = ["migrate", "-c", config, "--batch-size", "5", "--no-progress"]

        def migrate_until(events: int, sig: signal.Signals) -> subprocess.Popen:
            """Start migrate; once ``events`` are migrated, send ``sig``."""
            process = subprocess.Popen(
                [sys.executable, "-m", "synapse_nidstate.cli", *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                # As from an operator's terminal: a shell without job control
                # (CI's) starts background jobs with SIGINT ignored, and
                # children inherit that; Ctrl-C must reach the command.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            self.addCleanup(lambda: process.poll() is None and process.kill())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.05)
                if process.poll() is not None or _migrated_events(database) >= events:
                    break
            self.assertIsNone(process.poll(), "migrate finished before the signal")
            process.send_signal(sig)
            process.wait(60)
            return process

        interrupted = migrate_until(40, signal.SIGINT)
        stderr = interrupted.stderr.read()  # type: ignore[union-attr]
        self.assertEqual(interrupted.returncode, 130, stderr)
        self.assertIn("synapse-nidstate: migrate stopped by a signal", stderr)
        self.assertIn("run it again to go on", stderr)
        self.assertNotIn("Traceback", stderr)
        done_at_interrupt = _migrated_events(database)
        self.assertGreater(done_at_interrupt, 0)

        check = self.write_config(database)
        migrate_until(done_at_interrupt + 100, signal.SIGKILL)
        done_at_kill = _migrated_events(database)
        self.assertGreater(done_at_kill, done_at_interrupt)

        rerun = _cli(*args)
        self.assertEqual(rerun.returncode, 0, rerun.stderr)
        self.assertIn("migrated", rerun.stdout)
        # Nothing alarming for the operator: a second store in one process
        # would register its caches' metrics twice (Synapse logs an ERROR each).
        self.assertNotIn(" ERROR ", rerun.stderr)
        if self.engine == "postgres":
            # The tables it filled have planner statistics (reltuples is -1
            # for a table never analyzed nor vacuumed).
            self.assertIn("analyzed the module's tables", rerun.stdout)
            unanalyzed = _query(
                database,
                "SELECT relname FROM pg_class WHERE relkind = 'r'"
                " AND relname LIKE 'nidstate_%' AND reltuples < 0",
            )
            self.assertEqual(unanalyzed, [])
        verified = _cli("verify", "-c", check, "--no-progress")
        self.assertEqual(verified.returncode, 0, verified.stdout + verified.stderr)
        self.assertIn("mismatches: 0", verified.stdout)
        self.assertIn("not mirrored (answered by Synapse): 0", verified.stdout)
        self.assertIn("orphans: 0 state groups", verified.stdout)

        # The same rows as a run that was never interrupted.
        other = _cli(*args[:1], "-c", self.write_config(uninterrupted), *args[3:])
        self.assertEqual(other.returncode, 0, other.stderr)
        self.assertEqual(_row_counts(database), _row_counts(uninterrupted))

        # A sample and one room, as operators ask for them.
        room_id = _any_room(database)
        for extra in (["--sample", "50"], ["--room", room_id], ["--json"]):
            result = _cli("verify", "-c", check, "--no-progress", *extra)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    @in_logcontext
    async def test_verify_reports_mismatches_and_orphans(self) -> None:
        database = self.database_config()
        hs = await self.make_homeserver({"mode": "mirror"}, database=database)
        history = await build_history(hs, messages_per_room=1)
        await self.stop_homeserver(hs)
        config = self.write_config(database)
        self.assertEqual(_cli("verify", "-c", config, "--no-progress").returncode, 0)

        # Break the mirror on purpose: point the newest group at the oldest
        # group's snapshot, and leave a row for a group Synapse does not have.
        _execute(
            database,
            "UPDATE nidstate_state_groups SET snapshot_nid = (SELECT MIN(snapshot_nid)"
            " FROM nidstate_state_groups) WHERE state_group = (SELECT MAX(state_group)"
            " FROM nidstate_state_groups)",
        )
        _execute(
            database,
            "INSERT INTO nidstate_state_groups (state_group, snapshot_nid)"
            " SELECT MAX(state_group) + 1000000, MIN(snapshot_nid) FROM nidstate_state_groups",
        )
        result = _cli("verify", "-c", config, "--no-progress")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("MISMATCH $", result.stdout)
        self.assertIn("ORPHAN state group ", result.stdout)
        self.assertIn("orphans: 1 state groups", result.stdout)
        self.assertTrue(history.rooms)

    @in_logcontext
    async def test_drop_then_synapse_runs_without_then_catches_up(self) -> None:
        database = self.database_config()
        # Nothing reclaimed (drop refuses then: tests/test_reclaim_cli.py).
        hs = await self.make_homeserver({"mode": "serve", "reclaim": {}}, database=database)
        history = await build_history(hs, messages_per_room=1)
        await self.stop_homeserver(hs)
        config = self.write_config(database)

        refused = _cli("drop", "-c", config, stdin=subprocess.DEVNULL)
        self.assertEqual(refused.returncode, 2, refused.stdout)
        self.assertEqual(_row_counts(database)["nidstate_events"] > 0, True)
        dropped = _cli("drop", "-c", config, "--yes")
        self.assertEqual(dropped.returncode, 0, dropped.stderr)
        self.assertEqual(_tables(database) & set(TABLES), set())

        # Synapse, without the module, runs unchanged.
        hs = await self.make_homeserver(None, database=database)
        await Driver(hs).message(history.users[0], history.rooms[0], "without the module")
        await self.stop_homeserver(hs)
        # Enabled again: tables come back, migrate catches up the whole gap.
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        module = self.module(hs)
        self.assertGreater(await module.migrator.remaining(), 0)
        await module.migrator.run()
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters_for(hs, history.users))

    def test_bad_input_is_a_clear_error(self) -> None:
        missing = _cli("verify", "-c", "/nonexistent/homeserver.yaml")
        self.assertEqual(missing.returncode, 2)
        self.assertIn("cannot read /nonexistent/homeserver.yaml", missing.stderr)
        self.assertNotIn("Traceback", missing.stderr)
        config = self.write_config(self.database_config())
        bad_room = _cli("verify", "-c", config, "--room", "not-a-room")
        self.assertEqual(bad_room.returncode, 2)
        self.assertIn("not a Matrix room ID", bad_room.stderr)
        self.assertNotIn("Traceback", bad_room.stderr)
        bad_sample = _cli("verify", "-c", config, "--sample", "-3")
        self.assertEqual(bad_sample.returncode, 2)
        self.assertIn("must be a positive integer", bad_sample.stderr)
        with open(config) as f:
            raw = yaml.safe_load(f)
        raw["modules"][0]["config"]["mode"] = "fast"
        with open(config, "w") as f:
            yaml.safe_dump(raw, f)
        bad_mode = _cli("migrate", "-c", config)
        self.assertEqual(bad_mode.returncode, 2)
        self.assertIn("mode", bad_mode.stderr)
        self.assertNotIn("Traceback", bad_mode.stderr)


def _connect(database: dict[str, Any]) -> Any:
    if database["name"] == "sqlite3":
        import sqlite3

        return sqlite3.connect(database["args"]["database"], timeout=30)
    import psycopg2

    args = database["args"]
    return psycopg2.connect(
        host=args["host"], port=args["port"], user=args["user"], dbname=args["database"]
    )


def _query(database: dict[str, Any], sql: str) -> list[tuple]:
    conn = _connect(database)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchall()
    finally:
        conn.close()


def _execute(database: dict[str, Any], sql: str) -> None:
    conn = _connect(database)
    try:
        conn.cursor().execute(sql)
        conn.commit()
    finally:
        conn.close()


def _tables(database: dict[str, Any]) -> set[str]:
    if database["name"] == "sqlite3":
        rows = _query(database, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = _query(
            database,
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
        )
    return {row[0] for row in rows}


def _migrated_events(database: dict[str, Any]) -> int:
    if "nidstate_events" not in _tables(database):
        return 0
    return _query(
        database,
        "SELECT COUNT(*) FROM event_to_state_groups AS esg"
        " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group",
    )[0][0]


def _row_counts(database: dict[str, Any]) -> dict[str, int]:
    return {t: _query(database, f"SELECT COUNT(*) FROM {t}")[0][0] for t in TABLES}


def _any_room(database: dict[str, Any]) -> str:
    return _query(database, "SELECT room_id FROM rooms ORDER BY room_id LIMIT 1")[0][0]


class SqliteCliTests(CliTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresCliTests(CliTests, HomeserverTestCase):
    engine = "postgres"
