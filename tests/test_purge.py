"""Purges and room deletion: the mirror follows Synapse and leaves no orphan rows."""

import json
from typing import Any

from synapse.storage.engines import PostgresEngine
from synapse.types import TaskStatus
from synapse.types.state import StateFilter
from synapse.util.duration import Duration

from synapse_nidstate.algebra import unpack_nids
from synapse_nidstate.commands.verify import find_orphans
from synapse_nidstate.storage.reclaim import RECLAIMED_COMPAT_VERSION
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import build_history, room_event_ids


async def _answers(module: Any, event_ids: list[str]) -> tuple[dict, dict]:
    """Synapse's answer for each event it still has state for, and the mirror's."""
    native = {}
    for event_id in event_ids:
        try:
            native.update(await module.lookups.native_state_ids([event_id], StateFilter.all()))
        except Exception:
            pass  # purged: Synapse has no state for it any more
    mirrored = await module.lookups.mirrored_state_ids(event_ids, StateFilter.all())
    return native, mirrored


def _unreferenced_txn(txn: Any) -> tuple[set[int], set[int]]:
    """Snapshots no state group uses, and blocks no snapshot lists."""
    txn.execute("SELECT snapshot_nid FROM nidstate_state_groups")
    used = {row[0] for row in txn.fetchall()}
    txn.execute("SELECT snapshot_nid, block_nids FROM nidstate_snapshots")
    snapshots = {nid: unpack_nids(blocks) for nid, blocks in txn.fetchall()}
    listed = {b for blocks in snapshots.values() for b in blocks}
    txn.execute("SELECT block_nid FROM nidstate_blocks")
    blocks = {row[0] for row in txn.fetchall()}
    return set(snapshots) - used, blocks - listed


class PurgeTests:
    #: Reclaim every group before purging (the variants below).
    reclaim = False

    def config(self) -> dict[str, Any]:
        """Mode serve; the reclaiming variants reclaim themselves (a run of the
        suite with NIDSTATE_TEST_RECLAIM=eager leaves them as they are)."""
        return {"mode": "serve", "reclaim": {}} if self.reclaim else {"mode": "serve"}

    async def _history(self, hs: Any, messages_per_room: int) -> Any:
        history = await build_history(hs, messages_per_room=messages_per_room)
        if self.reclaim:
            totals = await self.module(hs).reclaimer.run()
            assert totals.groups > 0 and totals.refused == 0, totals
        return history

    async def _reclaim_left_consistent(self, hs: Any) -> None:
        """No mark for a group Synapse deleted, and the compat marker set exactly
        while some group is reclaimed."""
        if not self.reclaim:
            return

        def check_txn(txn: Any) -> tuple[int, int, int]:
            txn.execute(
                "SELECT COUNT(*) FROM nidstate_reclaimed_groups AS r WHERE NOT EXISTS"
                " (SELECT 1 FROM state_groups AS sg WHERE sg.id = r.state_group)"
            )
            orphans = txn.fetchone()[0]
            txn.execute("SELECT COUNT(*) FROM nidstate_reclaimed_groups")
            marked = txn.fetchone()[0]
            txn.execute("SELECT compat_version FROM schema_compat_version")
            return orphans, marked, txn.fetchone()[0]

        orphans, marked, compat = await self.module(hs).store.db_pool.runInteraction(
            "reclaim_left", check_txn
        )
        self.assertEqual(orphans, 0)
        self.assertEqual(compat == RECLAIMED_COMPAT_VERSION, marked > 0)
    @in_logcontext
    async def test_purge_history_then_unreferenced_groups(self) -> None:
        hs = await self.make_homeserver(self.config())
        history = await self._history(hs, 6)
        module = self.module(hs)
        room_id = history.rooms[0]
        event_ids, _ = await room_event_ids(hs, room_id)
        store = hs.get_datastores().main
        cut = event_ids[len(event_ids) * 2 // 3]
        token = await (await store.get_topological_token_for_event(cut)).to_string(store)

        purge = hs.get_storage_controllers().purge_events
        await purge.purge_history(room_id, token, True)

        native, mirrored = await _answers(module, event_ids)
        self.assertLess(len(native), len(event_ids))  # something was purged
        # Synapse streams the purge to its workers as a cache invalidation for
        # the room; there (and here) the mirror's event -> snapshot cache goes.
        await module.lookups.mirrored_state_ids(event_ids, StateFilter.all())
        self.assertGreater(len(module.store._event_snapshots), 0)
        hs.get_datastores().main._invalidate_caches_for_room_events(room_id)
        self.assertEqual(len(module.store._event_snapshots), 0)
        self.assertEqual(mirrored, native)
        self.assertEqual((await find_orphans(hs)).count, 0)

        # Synapse deletes the unreferenced state groups later; so does the mirror.
        state = hs.get_datastores().state
        db_pool = module.store.db_pool
        snapshots_before = await db_pool.simple_select_onecol(
            "nidstate_snapshots", None, "snapshot_nid", desc="t"
        )
        groups_before = await state.db_pool.simple_select_onecol(
            "state_groups", {"room_id": room_id}, "id"
        )
        # -1, not 0: Synapse picks groups marked strictly before now minus the
        # delay, and a fast purge marks them in the same millisecond.
        hs.get_datastores().state_deletion.DELAY_BEFORE_DELETION_MS = -1
        await purge._delete_state_groups_loop()
        groups_after = await state.db_pool.simple_select_onecol(
            "state_groups", {"room_id": room_id}, "id"
        )
        self.assertLess(len(groups_after), len(groups_before))
        # The snapshots and blocks only the deleted groups used are reclaimed.
        snapshots_after = await db_pool.simple_select_onecol(
            "nidstate_snapshots", None, "snapshot_nid", desc="t"
        )
        self.assertLess(len(snapshots_after), len(snapshots_before))
        self.assertEqual(
            await db_pool.runInteraction("unreferenced", _unreferenced_txn), (set(), set())
        )
        orphans = await find_orphans(hs)
        self.assertEqual(orphans.count, 0, orphans)
        # What remains is still answered exactly.
        native, mirrored = await _answers(module, event_ids)
        self.assertEqual(mirrored, native)
        await self._reclaim_left_consistent(hs)

    @in_logcontext
    async def test_purge_room(self) -> None:
        hs = await self.make_homeserver(self.config())
        history = await self._history(hs, 2)
        module = self.module(hs)
        gone, kept = history.rooms[1], history.rooms[0]
        gone_events, _ = await room_event_ids(hs, gone)
        kept_events, _ = await room_event_ids(hs, kept)
        purge = hs.get_storage_controllers().purge_events
        await purge.purge_room(gone)
        await purge.purge_room(gone)  # idempotent, as Synapse's own steps are

        def rows_txn(txn: Any) -> int:
            txn.execute(
                "SELECT COUNT(*) FROM nidstate_rooms WHERE room_id = ?", (gone,)
            )
            return txn.fetchone()[0]

        self.assertEqual(await module.store.db_pool.runInteraction("t", rows_txn), 0)
        self.assertEqual(
            await module.lookups.mirrored_state_ids(gone_events, StateFilter.all()), {}
        )
        # Synapse has no state for them any more, and raises as it does for
        # unknown events; the mirror does not answer in its place.
        with self.assertRaises((KeyError, RuntimeError)):
            await hs.get_storage_controllers().state.get_state_ids_for_events(gone_events[:1])
        self.assertEqual((await find_orphans(hs)).count, 0)
        native, mirrored = await _answers(module, kept_events)
        self.assertEqual(mirrored, native)
        self.assertEqual(len(mirrored), len(kept_events))
        await self._reclaim_left_consistent(hs)


    @in_logcontext
    async def test_delete_room_admin_api(self) -> None:
        # What DELETE /_synapse/admin/v2/rooms/<room_id> starts: a scheduled
        # task that shuts the room down and purges it.
        hs = await self.make_homeserver(self.config())
        history = await self._history(hs, 2)
        module = self.module(hs)
        gone, kept = history.rooms[0], history.rooms[1]
        gone_events, _ = await room_event_ids(hs, gone)
        pagination = hs.get_pagination_handler()
        delete_id = await pagination.start_shutdown_and_purge_room(
            room_id=gone,
            shutdown_params={
                "new_room_user_id": None,
                "new_room_name": None,
                "message": None,
                "requester_user_id": history.users[0],
                "block": False,
                "purge": True,
                "force_purge": True,
            },
        )
        scheduler = hs.get_task_scheduler()
        clock = hs.get_clock()
        for _ in range(200):
            task = await scheduler.get_task(delete_id)
            if task is not None and task.status in (TaskStatus.COMPLETE, TaskStatus.FAILED):
                break
            await clock.sleep(Duration(milliseconds=50))
        assert task is not None
        self.assertEqual(task.status, TaskStatus.COMPLETE, task.error)

        def room_rows_txn(txn: Any) -> int:
            txn.execute("SELECT COUNT(*) FROM nidstate_rooms WHERE room_id = ?", (gone,))
            return txn.fetchone()[0]

        self.assertEqual(await module.store.db_pool.runInteraction("t", room_rows_txn), 0)
        self.assertEqual(
            await module.lookups.mirrored_state_ids(gone_events, StateFilter.all()), {}
        )
        self.assertEqual((await find_orphans(hs)).count, 0)
        self.assertEqual(
            await module.store.db_pool.runInteraction("unreferenced", _unreferenced_txn),
            (set(), set()),
        )
        kept_events, _ = await room_event_ids(hs, kept)
        native, mirrored = await _answers(module, kept_events)
        self.assertEqual(mirrored, native)
        await self._reclaim_left_consistent(hs)


class _Recorder:
    """A transaction that records the statements run through it."""

    def __init__(self, txn: Any, statements: list[tuple[str, tuple]]) -> None:
        self._txn = txn
        self._statements = statements

    def execute(self, sql: str, args: Any = ()) -> None:
        self._statements.append((sql, tuple(args)))
        self._txn.execute(sql, args)

    def __iter__(self) -> Any:
        return iter(self._txn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def _scans_txn(txn: Any, sql: str, args: tuple) -> list[str]:
    """The module tables ``sql`` reads whole (no index), from the engine's plan."""
    if isinstance(txn.database_engine, PostgresEngine):
        # Tiny test tables make a scan the cheapest plan: forbid it, so that a
        # scan in the plan means no index could serve the statement.
        txn.execute("SET LOCAL enable_seqscan = off")
        txn.execute(f"EXPLAIN (FORMAT JSON) {sql}", args)
        plan = txn.fetchone()[0]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        scans, nodes = [], [plan[0]["Plan"]]
        while nodes:
            node = nodes.pop()
            nodes.extend(node.get("Plans", ()))
            relation = node.get("Relation Name", "")
            if node["Node Type"] == "Seq Scan" and relation.startswith("nidstate_"):
                scans.append(relation)
        return scans
    txn.execute(f"EXPLAIN QUERY PLAN {sql}", args)
    return [
        row[-1]
        for row in txn.fetchall()
        if row[-1].startswith("SCAN ") and "json_each" not in row[-1]
    ]


class PurgeIndexTests:
    @in_logcontext
    async def test_purge_statements_use_indexes(self) -> None:
        # Every statement the module runs for Synapse's purges (of history and
        # its unreferenced groups, of a room) finds its rows by an index: none
        # reads a module table whole (schema 6 added the two that did).
        hs = await self.make_homeserver({"mode": "serve"})
        module = self.module(hs)
        history = await build_history(hs, messages_per_room=4)
        store = module.store
        statements: list[tuple[str, tuple]] = []
        purge_room_txn, forget_txn = store.purge_room_txn, store.forget_state_groups_txn
        store.purge_room_txn = lambda txn, *a: purge_room_txn(_Recorder(txn, statements), *a)  # type: ignore[method-assign]
        store.forget_state_groups_txn = (  # type: ignore[method-assign]
            lambda txn, *a: forget_txn(_Recorder(txn, statements), *a)
        )
        room_id = history.rooms[0]
        event_ids, _ = await room_event_ids(hs, room_id)
        main = hs.get_datastores().main
        cut = event_ids[len(event_ids) * 2 // 3]
        token = await (await main.get_topological_token_for_event(cut)).to_string(main)
        purge = hs.get_storage_controllers().purge_events
        await purge.purge_history(room_id, token, True)
        # -1, not 0: Synapse picks groups marked strictly before now minus the
        # delay, and a fast purge marks them in the same millisecond.
        hs.get_datastores().state_deletion.DELAY_BEFORE_DELETION_MS = -1
        await purge._delete_state_groups_loop()
        await purge.purge_room(history.rooms[1])
        seen = {sql.split()[0] + " " + sql.split("FROM ")[1].split()[0] for sql, _ in statements}
        self.assertIn("DELETE nidstate_events", seen)
        self.assertIn("SELECT nidstate_snapshots", seen)
        scans = {}
        for sql, args in statements:
            if "LIMIT 1" in sql:  # one row of a table: stops at the first
                continue
            found = await store.db_pool.runInteraction("explain", _scans_txn, sql, args)
            if found:
                scans[sql] = found
        self.assertEqual(scans, {})


class SqlitePurgeTests(PurgeTests, PurgeIndexTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresPurgeTests(PurgeTests, PurgeIndexTests, HomeserverTestCase):
    engine = "postgres"


class SqliteReclaimedPurgeTests(PurgeTests, HomeserverTestCase):
    """The same purges on rooms whose state groups are reclaimed."""

    engine = "sqlite"
    reclaim = True


class PostgresReclaimedPurgeTests(PurgeTests, HomeserverTestCase):
    engine = "postgres"
    reclaim = True
