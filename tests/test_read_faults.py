"""Faults of the module's own: a read of the NID tables that fails falls back to
Synapse where Synapse's rows exist and fails loudly where they are reclaimed; a
write that fails inside Synapse's transaction rolls back to its savepoint
unless Synapse must retry the transaction; a cold read sees one snapshot of
the tables while a purge commits beside it."""

import sqlite3
import threading
from typing import Any

import psycopg2
from synapse.api.constants import EventTypes, Membership
from synapse.api.errors import SynapseError
from synapse.server import HomeServer
from synapse.storage.engines import PostgresEngine
from synapse.types.state import StateFilter
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from synapse_nidstate import algebra
from synapse_nidstate.commands.verify import compare_with_native
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.runtime.faults import FaultLog, StateUnavailable
from synapse_nidstate.storage import Contained, CorruptState, in_savepoint, must_retry
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    HomeserverTestCase,
    SqlStatements,
    in_logcontext,
)
from tests.test_reclaim import SERVE, count, event_digest, forget_caches, wrapped_group_digest

#: (what, SQL run on the snapshot of the room's last event): each leaves the
#: NID tables contradicting themselves in a way a read must notice.
FAULTS = ("block deleted", "block corrupted", "snapshot names a missing block", "mapping to a missing snapshot")


async def small_room(hs: HomeServer) -> tuple[Driver, str, str]:
    """One room with members, state changes and messages; (driver, alice, room)."""
    d = Driver(hs)
    alice, bob, carol = [await d.register(name) for name in ("alice", "bob", "carol")]
    room_id = await d.create_room(alice, "public_chat", name="Faults", topic="first")
    for user in (bob, carol):
        await d.membership(user, user, room_id, Membership.JOIN)
    await d.send(alice, room_id, EventTypes.Topic, {"topic": "second"}, "")
    for i in range(3):
        await d.message(bob, room_id, f"hello {i}")
    return d, alice, room_id


async def last_event_snapshot(hs: HomeServer, room_id: str) -> tuple[str, int, int]:
    """(event, its state group, that group's snapshot) of the room's last event."""

    def read_txn(txn: Any) -> tuple[str, int, int]:
        txn.execute(
            "SELECT e.event_id, esg.state_group, g.snapshot_nid FROM events AS e"
            " JOIN event_to_state_groups AS esg ON esg.event_id = e.event_id"
            " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
            " WHERE e.room_id = ? ORDER BY e.stream_ordering DESC LIMIT 1",
            (room_id,),
        )
        return txn.fetchone()

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_last", read_txn)


async def inject(hs: HomeServer, fault: str, group: int, snapshot_nid: int) -> None:
    """Break the NID tables under ``snapshot_nid`` (the snapshot of ``group``)."""

    def fault_txn(txn: Any) -> None:
        txn.execute(
            "SELECT block_nids FROM nidstate_snapshots WHERE snapshot_nid = ?", (snapshot_nid,)
        )
        blocks = algebra.unpack_nids(txn.fetchone()[0])
        if fault == "block deleted":
            txn.execute("DELETE FROM nidstate_blocks WHERE block_nid = ?", (blocks[-1],))
        elif fault == "block corrupted":
            # Same length, one event NID changed: it decodes, to another state.
            txn.execute("SELECT entries FROM nidstate_blocks WHERE block_nid = ?", (blocks[0],))
            entries = bytearray(txn.fetchone()[0])
            entries[-4] ^= 0x01
            txn.execute(
                "UPDATE nidstate_blocks SET entries = ? WHERE block_nid = ?", (entries, blocks[0])
            )
        elif fault == "snapshot names a missing block":
            txn.execute("SELECT MAX(block_nid) FROM nidstate_blocks")
            nids = (*blocks, txn.fetchone()[0] + 1000)
            txn.execute(
                "UPDATE nidstate_snapshots SET block_nids = ?, content_hash = ?"
                " WHERE snapshot_nid = ?",
                (
                    bytearray(algebra.pack_nids(nids)),
                    bytearray(algebra.snapshot_hash(nids)),
                    snapshot_nid,
                ),
            )
        elif fault == "mapping to a missing snapshot":
            txn.execute(
                "UPDATE nidstate_state_groups SET snapshot_nid = ? WHERE state_group = ?",
                (2**40, group),
            )
        else:
            raise AssertionError(fault)

    await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_fault", fault_txn)


class ReadFaultTests:
    @in_logcontext
    async def test_a_failed_read_falls_back_where_synapse_has_the_rows(self) -> None:
        # Each fault on a database of its own (a fault in a shared block
        # reaches other snapshots too): every event and every group still gets
        # Synapse's answer, counted as failed, never as served.
        for fault in FAULTS:
            hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
            module = self.module(hs)  # type: ignore[attr-defined]
            d, alice, room_id = await small_room(hs)
            events_before = await event_digest(hs, [room_id])
            groups_before = await wrapped_group_digest(hs)
            event_id, group, snapshot_nid = await last_event_snapshot(hs, room_id)
            await inject(hs, fault, group, snapshot_nid)
            forget_caches(hs, module)
            lookups, group_reads = module.stats.lookups, module.stats.group_reads
            failed_before = lookups.failed
            self.assertEqual(  # type: ignore[attr-defined]
                await event_digest(hs, [room_id]), events_before, fault
            )
            self.assertGreater(lookups.failed, failed_before, fault)  # type: ignore[attr-defined]
            forget_caches(hs, module)
            failed_before = group_reads.failed
            self.assertEqual(await wrapped_group_digest(hs), groups_before, fault)  # type: ignore[attr-defined]
            self.assertGreater(group_reads.failed, failed_before, fault)  # type: ignore[attr-defined]
            # The same through the read with caches (the module's own
            # transaction, answered by Synapse in a new one).
            forget_caches(hs, module)
            failed_before = group_reads.failed
            cached_read = await hs.get_datastores().state._get_state_for_groups(groups_before)
            self.assertEqual(cached_read, groups_before, fault)  # type: ignore[attr-defined]
            self.assertGreater(group_reads.failed, failed_before, fault)  # type: ignore[attr-defined]
            self.assertEqual((lookups.unavailable, group_reads.unavailable), (0, 0), fault)  # type: ignore[attr-defined]
            # verify names the event whose state the module cannot read.
            forget_caches(hs, module)
            result = await compare_with_native(
                module.lookups, list(events_before), {"all": StateFilter.all()}
            )
            self.assertIn(event_id, result.unreadable, fault)  # type: ignore[attr-defined]
            self.assertEqual((result.unavailable, result.mismatches), ({}, []), fault)  # type: ignore[attr-defined]
            # The room goes on: new events persist and are answered.
            later = await d.send(alice, room_id, EventTypes.Topic, {"topic": "after"}, "")
            state = await hs.get_storage_controllers().state.get_state_ids_for_event(
                later.event_id
            )
            self.assertEqual(state[(EventTypes.Topic, "")], later.event_id, fault)  # type: ignore[attr-defined]
            await self.stop_homeserver(hs)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_a_failed_read_of_a_reclaimed_group_fails_loudly(self) -> None:
        for fault in FAULTS:
            hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
            module = self.module(hs)  # type: ignore[attr-defined]
            _, _, room_id = await small_room(hs)
            events_before = await event_digest(hs, [room_id])
            event_id, group, snapshot_nid = await last_event_snapshot(hs, room_id)
            self.assertEqual((await module.reclaimer.run()).refused, 0)  # type: ignore[attr-defined]
            self.assertEqual(  # type: ignore[attr-defined]
                await count(hs, f"SELECT COUNT(*) FROM state_groups_state WHERE state_group = {group}"),
                0,
            )
            await inject(hs, fault, group, snapshot_nid)
            forget_caches(hs, module)
            controller = hs.get_storage_controllers().state
            with self.assertRaises(StateUnavailable, msg=fault) as caught:  # type: ignore[attr-defined]
                await controller.get_state_ids_for_event(event_id)
            # What the client gets: Synapse's JSON error, HTTP 500, saying why.
            error = caught.exception
            self.assertIsInstance(error, SynapseError)  # type: ignore[attr-defined]
            self.assertEqual(error.code, 500)  # type: ignore[attr-defined]
            self.assertIn("unavailable on this server", error.error_dict(None)["error"])  # type: ignore[attr-defined]
            self.assertGreater(module.stats.lookups.unavailable, 0, fault)  # type: ignore[attr-defined]
            # A read by state group fails the same way: never Synapse's answer
            # from rows that are gone.
            forget_caches(hs, module)
            with self.assertRaises(StateUnavailable, msg=fault):  # type: ignore[attr-defined]
                await hs.get_datastores().state._get_state_for_groups([group])
            self.assertGreater(module.stats.group_reads.unavailable, 0, fault)  # type: ignore[attr-defined]
            forget_caches(hs, module)
            result = await compare_with_native(
                module.lookups, list(events_before), {"all": StateFilter.all()}
            )
            self.assertIn(event_id, result.unavailable, fault)  # type: ignore[attr-defined]
            self.assertFalse(result.ok, fault)  # type: ignore[attr-defined]
            self.assertNotEqual(events_before, {}, fault)  # type: ignore[attr-defined]
            await self.stop_homeserver(hs)  # type: ignore[attr-defined]


    @in_logcontext
    async def test_reclaim_keeps_the_rows_of_a_group_it_cannot_read(self) -> None:
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        _, _, room_id = await small_room(hs)
        event_id, group, snapshot_nid = await last_event_snapshot(hs, room_id)
        await inject(hs, "block corrupted", group, snapshot_nid)
        forget_caches(hs, module)
        rows = f"SELECT COUNT(*) FROM state_groups_state WHERE state_group = {group}"
        before = await count(hs, rows)
        totals = await module.reclaimer.run()
        # Refused, not a failed batch: the groups that do not read the block
        # are reclaimed, those that do keep their rows, and still answer.
        self.assertGreater(totals.refused, 0)  # type: ignore[attr-defined]
        self.assertGreater(totals.groups, 0)  # type: ignore[attr-defined]
        self.assertEqual(await count(hs, rows), before)  # type: ignore[attr-defined]
        forget_caches(hs, module)
        state = await hs.get_storage_controllers().state.get_state_ids_for_event(event_id)
        self.assertGreater(len(state), 0)  # type: ignore[attr-defined]


class WriteFaultTests:
    @in_logcontext
    async def test_a_fault_of_the_mirror_stays_in_its_savepoint(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        d, alice, room_id = await small_room(hs)
        db_pool = hs.get_datastores().main.db_pool
        postgres = isinstance(db_pool.engine, PostgresEngine)

        def break_txn(txn: Any) -> None:
            if postgres:  # a constraint violation, mid-mirror
                txn.execute(
                    "ALTER TABLE nidstate_state_groups ADD CONSTRAINT nidstate_test_fault"
                    " CHECK (state_group < 0) NOT VALID"
                )
            else:  # SQLite's OperationalError "no such table", mid-mirror
                txn.execute("ALTER TABLE nidstate_snapshots RENAME TO nidstate_snapshots_away")

        def repair_txn(txn: Any) -> None:
            if postgres:
                txn.execute("ALTER TABLE nidstate_state_groups DROP CONSTRAINT nidstate_test_fault")
            else:
                txn.execute("ALTER TABLE nidstate_snapshots_away RENAME TO nidstate_snapshots")

        await db_pool.runInteraction("nidstate_test_break", break_txn)
        failures = module.stats.mirror.write_failures
        event = await d.send(alice, room_id, EventTypes.Topic, {"topic": "during"}, "")
        await db_pool.runInteraction("nidstate_test_repair", repair_txn)
        # Synapse persisted the event; the mirror's part was rolled back.
        self.assertEqual(module.stats.mirror.write_failures, failures + 1)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, f"SELECT COUNT(*) FROM events WHERE event_id = '{event.event_id}'"), 1
        )
        forget_caches(hs, module)
        controller = hs.get_storage_controllers().state
        fallback = module.stats.lookups.fallback
        state = await controller.get_state_ids_for_event(event.event_id)
        self.assertEqual(state[(EventTypes.Topic, "")], event.event_id)  # type: ignore[attr-defined]
        self.assertEqual(module.stats.lookups.fallback, fallback + 1)  # type: ignore[attr-defined]
        # And the mirror goes on with the next event.
        later = await d.message(alice, room_id, "after")
        served = module.stats.lookups.served
        state = await controller.get_state_ids_for_event(later.event_id)
        self.assertEqual(state[(EventTypes.Topic, "")], event.event_id)  # type: ignore[attr-defined]
        self.assertEqual(module.stats.lookups.served, served + 1)  # type: ignore[attr-defined]


class ConsistentReadTests:
    @in_logcontext
    async def test_a_purge_between_the_statements_of_a_read(self) -> None:
        # A cold read of the state at an event: its first statement finds the
        # snapshot; then, before it reads the blocks, the room is purged (by
        # Synapse, through its own purge, on another connection), which deletes
        # the blocks. The read still answers the state it started on.
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        _, _, room_id = await small_room(hs)
        event_id, _, _ = await last_event_snapshot(hs, room_id)
        before = await event_digest(hs, [room_id])
        forget_caches(hs, module)
        store = module.store
        read_blocks = store._blocks_txn
        purged = threading.Event()
        purges: list[Deferred] = []

        def purge() -> None:
            d = Deferred.fromCoroutine(
                hs.get_storage_controllers().purge_events.purge_room(room_id)
            )
            d.addBoth(lambda result: (purged.set(), result)[1])
            purges.append(d)

        def blocks_after_a_purge(*args: Any, **kwargs: Any) -> Any:
            if not purged.is_set():
                reactor.callFromThread(purge)  # type: ignore[attr-defined]
                if not purged.wait(60):
                    raise AssertionError("the purge did not finish")
            return read_blocks(*args, **kwargs)

        store._blocks_txn = blocks_after_a_purge  # type: ignore[method-assign]
        try:
            served, failed = module.stats.lookups.served, module.stats.lookups.failed
            state = await module.lookups.mirrored_state_ids([event_id], StateFilter.all())
        finally:
            store._blocks_txn = read_blocks  # type: ignore[method-assign]
        await purges[0]
        self.assertTrue(purged.is_set())  # type: ignore[attr-defined]
        self.assertEqual(state[event_id], before[event_id])  # type: ignore[attr-defined]
        self.assertEqual(module.stats.lookups.failed, failed)  # type: ignore[attr-defined]
        # The purge did delete them: a read now finds nothing of the room.
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, "SELECT COUNT(*) FROM nidstate_blocks"), 0
        )
        self.assertEqual(await module.lookups.mirrored_state_ids([event_id], StateFilter.all()), {})  # type: ignore[attr-defined]
        del served


class SavepointTests:
    """The module's savepoint is taken at its first statement: a read its caches
    answer costs Synapse's transaction nothing; a fault before any statement
    has nothing to roll back."""

    @in_logcontext
    async def test_the_savepoint_is_taken_at_the_first_statement(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        _, _, room_id = await small_room(hs)
        _, group, _ = await last_event_snapshot(hs, room_id)
        state_store = hs.get_datastores().state

        def txn_fn(txn: Any) -> list[list[str]]:
            runs = []
            for fn in (
                lambda t: 5,  # no statement
                lambda t: 1 / 0,  # a fault before any statement
                lambda t: t.execute("SELECT 1"),
                lambda t: t.execute("SELECT * FROM nidstate_no_such_table"),
            ):
                with SqlStatements("nidstate_test_savepoint") as statements:
                    try:
                        in_savepoint(txn, "nidstate_test", fn)
                    except Contained:
                        pass
                runs.append(statements.sql)
            # Synapse's transaction goes on after each.
            txn.execute("SELECT 2")
            runs.append(read_txn(txn))  # a group read from the tables
            return runs

        def read_txn(txn: Any) -> list[str]:
            with SqlStatements("nidstate_test_savepoint") as statements:
                state_store._get_state_groups_from_groups_txn(txn, [group], StateFilter.all())
            return statements.sql

        forget_caches(hs, self.module(hs))  # type: ignore[attr-defined]
        runs = await state_store.db_pool.runInteraction("nidstate_test_savepoint", txn_fn)
        nothing, fault, select, failed, cold = runs
        # The same read once the first committed (and filled the caches).
        warm = await state_store.db_pool.runInteraction("nidstate_test_savepoint", read_txn)
        self.assertEqual((nothing, fault), ([], []))  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            select, ["SAVEPOINT nidstate_test", "SELECT 1", "RELEASE SAVEPOINT nidstate_test"]
        )
        self.assertEqual(failed[0], "SAVEPOINT nidstate_test")  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            failed[-2:], ["ROLLBACK TO SAVEPOINT nidstate_test", "RELEASE SAVEPOINT nidstate_test"]
        )
        self.assertEqual(cold[0], "SAVEPOINT nidstate_group_read")  # type: ignore[attr-defined]
        self.assertEqual(warm, [])  # type: ignore[attr-defined]


class SqliteReadFaultTests(ReadFaultTests, WriteFaultTests, SavepointTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresReadFaultTests(
    ReadFaultTests, WriteFaultTests, SavepointTests, ConsistentReadTests, HomeserverTestCase
):
    engine = "postgres"


class MustRetryTests(unittest.TestCase):
    """Which errors escape the mirror's savepoint for Synapse to retry, with
    real errors of each engine."""

    def test_sqlite(self) -> None:
        from synapse.storage.engines import create_engine

        engine = create_engine({"name": "sqlite3", "args": {"database": ":memory:"}})
        path = self.mktemp()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        errors = {}
        for name, sql in [
            ("locked", "INSERT INTO t VALUES (1)"),
            ("no such table", "SELECT * FROM nidstate_nothing"),
            ("no such column", "SELECT nothing FROM t"),
            ("syntax", "SELEKT 1"),
        ]:
            try:
                other.execute(sql)
            except sqlite3.Error as e:
                errors[name] = e
        holder.execute("ROLLBACK")
        try:
            other.execute("INSERT INTO t VALUES (NULL)")
            other.execute("CREATE UNIQUE INDEX t_x ON t (x)")
            other.execute("INSERT INTO t VALUES (1)")
            other.execute("INSERT INTO t VALUES (1)")
        except sqlite3.Error as e:
            errors["constraint"] = e
        self.assertEqual(
            {name: must_retry(engine, e) for name, e in errors.items()},
            {"locked": True, "no such table": False, "no such column": False,
             "syntax": False, "constraint": False},
        )

    def test_postgres(self) -> None:
        from synapse.storage.engines import create_engine

        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        except psycopg2.OperationalError as e:
            import os

            if os.environ.get("CI"):
                self.fail(f"PostgreSQL is required in CI: {e}")
            raise unittest.SkipTest(str(e)) from e
        engine = create_engine({"name": "psycopg2", "args": {}})
        errors = {}
        for name, sql in [
            ("undefined table", "SELECT * FROM nidstate_nothing"),
            ("syntax", "SELEKT 1"),
            ("division by zero", "SELECT 1 / 0"),
            ("serialization failure", "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$"),
            ("deadlock", "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01'; END $$"),
            ("statement timeout", "SET LOCAL statement_timeout = 1; SELECT pg_sleep(1)"),
            ("connection lost", "SELECT pg_terminate_backend(pg_backend_pid())"),
        ]:
            try:
                with conn.cursor() as cursor:
                    cursor.execute(sql)
            except psycopg2.Error as e:
                errors[name] = e
            if conn.closed:
                break
            conn.rollback()
        conn.close()
        self.assertEqual(
            {name: must_retry(engine, e) for name, e in errors.items()},
            {"undefined table": False, "syntax": False, "division by zero": False,
             "serialization failure": True, "deadlock": True, "statement timeout": True,
             "connection lost": True},
        )


class FaultLogTests(unittest.TestCase):
    def test_each_cause_is_logged_once(self) -> None:
        # The same error in three reads (its message naming other rows each
        # time) is logged once; failing a request where it was answered before
        # is a cause of its own.
        errors = []
        for n in range(3):
            try:
                raise CorruptState(f"state blocks missing: {{{n}}}")
            except CorruptState as e:
                errors.append(e)
        faults = FaultLog()
        with self.assertLogs("synapse_nidstate.runtime.faults", "ERROR") as logged:
            for error in errors:
                faults.report("state group 1", error, fallback=True)
            faults.report("state group 1", errors[0], fallback=False)
        self.assertEqual(len(logged.records), 2)
        self.assertIn("answered by Synapse's own rows", logged.records[0].getMessage())
        self.assertIn("the request fails", logged.records[1].getMessage())
