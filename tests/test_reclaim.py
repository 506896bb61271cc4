"""Reclaim and restore on both engines: Synapse answers every event and every
state group as before, with (almost) no ``state_groups_state`` rows, and again
without the module after restore, with no more rows than before."""

from typing import Any

from synapse.api.constants import EventTypes
from synapse.logging.context import current_context
from synapse.server import HomeServer
from synapse.storage.databases.state.bg_updates import StateGroupBackgroundUpdateStore
from synapse.types.state import StateFilter

from synapse_nidstate import algebra
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.storage.reclaim import RECLAIMED_COMPAT_VERSION, SAVED_COMPAT_KEY
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import (
    all_groups,
    build_history,
    compare_every_delta,
    compare_room,
    filters_for,
    room_event_ids,
)

#: Mode serve, reclaim set explicitly: these tests reclaim themselves, so a run
#: of the suite with NIDSTATE_TEST_RECLAIM=eager leaves them as they are.
SERVE: dict[str, Any] = {"mode": "serve", "reclaim": {}}


async def count(hs: HomeServer, sql: str) -> Any:
    def count_txn(txn: Any) -> Any:
        txn.execute(sql)
        row = txn.fetchone()
        return None if row is None else row[0]

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_count", count_txn)


async def event_digest(hs: HomeServer, rooms: list[str]) -> dict[str, dict]:
    """Synapse's answer at every event of ``rooms``, through whatever serves it."""
    controller = hs.get_storage_controllers().state
    digest = {}
    for room_id in rooms:
        event_ids, _ = await room_event_ids(hs, room_id)
        for event_id, state in (await controller.get_state_ids_for_events(event_ids)).items():
            digest[event_id] = dict(state)
    return digest


async def native_group_digest(hs: HomeServer) -> dict[int, dict]:
    """Every group's state as Synapse's own code reads it from its rows (unwrapped)."""
    state = hs.get_datastores().state
    groups = await all_groups(hs)

    def read_txn(txn: Any) -> Any:
        return StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn(
            state, txn, groups, StateFilter.all()
        )

    answer = await state.db_pool.runInteraction("nidstate_test_native_groups", read_txn)
    return {group: dict(answer[group]) for group in groups}


async def wrapped_group_digest(hs: HomeServer) -> dict[int, dict]:
    """Every group's state as Synapse reads it with the module (the wrapped read)."""
    state = hs.get_datastores().state
    groups = await all_groups(hs)

    def read_txn(txn: Any) -> Any:
        return state._get_state_groups_from_groups_txn(txn, groups, StateFilter.all())

    answer = await state.db_pool.runInteraction("nidstate_test_wrapped_groups", read_txn)
    return {group: dict(answer[group]) for group in groups}


async def delta_digest(hs: HomeServer) -> dict[int, Any]:
    """Every group's ``get_state_group_delta`` as Synapse answers it (cache emptied)."""
    state = hs.get_datastores().state
    state.get_state_group_delta.invalidate_all()
    return {group: await state.get_state_group_delta(group) for group in await all_groups(hs)}


def transactions() -> int:
    """Database transactions the current logcontext has run (what Synapse's
    own tests count, ``channel.resource_usage.db_txn_count``)."""
    return current_context().get_resource_usage().db_txn_count


def forget_caches(hs: HomeServer, module: Any) -> None:
    """Cold: no cache of Synapse's or the module's holds a state any more."""
    state = hs.get_datastores().state
    state._state_group_cache.invalidate_all()
    state._state_group_members_cache.invalidate_all()
    state.get_state_group_delta.invalidate_all()
    hs.get_datastores().main._get_state_group_for_event.invalidate_all()
    module.store.clear_caches()


async def corrupt(hs: HomeServer, corruption: str) -> int:
    """Break what proves a group by its delta (a group with a predecessor whose
    snapshot its own extends by one block, and rows of its own; for
    "compaction row", one whose snapshot was cut anew); the group."""

    def corrupt_txn(txn: Any) -> int:
        if corruption == "full row":
            # A group Synapse stores in full (no edge: here the empty state
            # before a room's create event) gains a row.
            txn.execute(
                "SELECT MAX(g.state_group) FROM nidstate_state_groups AS g"
                " WHERE NOT EXISTS (SELECT 1 FROM state_group_edges AS e"
                "   WHERE e.state_group = g.state_group)"
            )
            (group,) = txn.fetchone()
            txn.execute(
                "INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id)"
                " SELECT ?, room_id, 'm.room.topic', '', (SELECT MIN(event_id) FROM events)"
                " FROM state_groups WHERE id = ?",
                (group, group),
            )
            if not txn.rowcount:
                raise AssertionError(f"state group {group} got no row")
            return group
        txn.execute(
            "SELECT e.state_group, e.prev_state_group, g.snapshot_nid, pg.snapshot_nid"
            " FROM state_group_edges AS e"
            " JOIN nidstate_state_groups AS g ON g.state_group = e.state_group"
            " JOIN nidstate_state_groups AS pg ON pg.state_group = e.prev_state_group"
            " WHERE EXISTS (SELECT 1 FROM state_groups_state AS s"
            "   WHERE s.state_group = e.state_group AND s.type = 'm.room.member')"
            " AND EXISTS (SELECT 1 FROM state_group_edges AS pe"
            "   WHERE pe.state_group = e.prev_state_group)"
            " ORDER BY e.state_group"
        )
        candidates = txn.fetchall()
        lists = {}
        for _, _, *snapshots in candidates:
            for nid in snapshots:
                txn.execute(
                    "SELECT block_nids FROM nidstate_snapshots WHERE snapshot_nid = ?", (nid,)
                )
                lists[nid] = algebra.unpack_nids(txn.fetchone()[0])
        extends = corruption != "compaction row"
        group, prev, snapshot, prev_snapshot = next(
            c for c in candidates[len(candidates) // 2:]
            if (lists[c[2]][:-1] == lists[c[3]]) == extends
        )
        if corruption == "block":
            # Its own block names another event, with a hash that matches.
            block_nid = lists[snapshot][-1]
            txn.execute("SELECT entries FROM nidstate_blocks WHERE block_nid = ?", (block_nid,))
            block = list(algebra.unpack_block(txn.fetchone()[0]))
            txn.execute("SELECT MAX(event_nid) FROM nidstate_events")
            block[0] = (*block[0][:2], txn.fetchone()[0])
            txn.execute(
                "UPDATE nidstate_blocks SET entries = ?, content_hash = ? WHERE block_nid = ?",
                (
                    bytearray(algebra.pack_block(tuple(block))),
                    bytearray(algebra.block_hash(tuple(block))),
                    block_nid,
                ),
            )
        elif corruption in ("delta row", "compaction row"):
            # One of its rows names another event.
            txn.execute(
                "UPDATE state_groups_state SET event_id = (SELECT MIN(e.event_id) FROM events"
                " AS e WHERE e.event_id <> state_groups_state.event_id)"
                " WHERE state_group = ? AND type = 'm.room.member'",
                (group,),
            )
            if not txn.rowcount:
                raise AssertionError(f"state group {group} has no member row to change")
        else:
            # Its edge skips its predecessor.
            txn.execute(
                "UPDATE state_group_edges SET prev_state_group ="
                " (SELECT prev_state_group FROM state_group_edges WHERE state_group = ?)"
                " WHERE state_group = ?",
                (prev, group),
            )
        return group

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_corrupt", corrupt_txn)


class ReclaimTests:
    @in_logcontext
    async def test_reclaim_then_restore(self) -> None:
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=4)
        events_before = await event_digest(hs, history.rooms)
        groups_before = await native_group_digest(hs)
        deltas_before = await delta_digest(hs)
        rows_before = await count(hs, "SELECT COUNT(*) FROM state_groups_state")
        compat_before = await count(hs, "SELECT compat_version FROM schema_compat_version")

        totals = await module.reclaimer.run()
        self.assertEqual(totals.refused, 0)  # type: ignore[attr-defined]
        # Most groups are proved by their delta: all but the first of each room
        # and those whose snapshot is a compaction (none in rooms this small).
        self.assertGreater(totals.by_delta, totals.groups // 2)  # type: ignore[attr-defined]
        rows_after = await count(hs, "SELECT COUNT(*) FROM state_groups_state")
        self.assertEqual(rows_before - rows_after, totals.rows)  # type: ignore[attr-defined]
        # Groups no event maps to keep their rows (no snapshot): a few here.
        self.assertLess(rows_after, 0.2 * rows_before)  # type: ignore[attr-defined]
        self.assertEqual(module.stats.reclaim.groups_reclaimed, totals.groups)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, "SELECT compat_version FROM schema_compat_version"),
            RECLAIMED_COMPAT_VERSION,
        )
        # A second run has nothing left to do.
        self.assertEqual((await module.reclaimer.run()).groups, 0)  # type: ignore[attr-defined]

        # Synapse, with the module, answers every event and every group as before,
        # from cold, and every edge's delta as before.
        forget_caches(hs, module)
        self.assertEqual(await event_digest(hs, history.rooms), events_before)  # type: ignore[attr-defined]
        forget_caches(hs, module)
        self.assertEqual(await wrapped_group_digest(hs), groups_before)  # type: ignore[attr-defined]
        served = module.stats.group_reads.served
        self.assertEqual(await delta_digest(hs), deltas_before)  # type: ignore[attr-defined]
        self.assertGreater(module.stats.group_reads.served, served)  # type: ignore[attr-defined]
        # Synapse's own answer (what verify compares with) is unchanged too.
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)
        # ... while Synapse's code alone no longer could answer.
        self.assertNotEqual(await native_group_digest(hs), groups_before)  # type: ignore[attr-defined]
        # New events build on reclaimed groups.
        driver, alice = Driver(hs), history.users[0]
        for room_id in history.rooms:
            await driver.send(alice, room_id, EventTypes.Topic, {"topic": "after reclaim"}, "")
            await driver.message(alice, room_id, "after reclaim")

        analyzed = "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'state_groups_state'"
        postgres = self.engine == "postgres"  # type: ignore[attr-defined]
        analyzed_before = await count(hs, analyzed) if postgres else 0
        restored = await module.reclaimer.restore()
        self.assertEqual(restored.groups, totals.groups)  # type: ignore[attr-defined]
        if postgres:
            # The planner's statistics describe the table restore wrote back.
            self.assertGreater(await count(hs, analyzed), analyzed_before)  # type: ignore[attr-defined]
        self.assertGreater(restored.by_delta, restored.groups // 2)  # type: ignore[attr-defined]
        self.assertEqual(await count(hs, "SELECT COUNT(*) FROM nidstate_reclaimed_groups"), 0)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, "SELECT compat_version FROM schema_compat_version"), compat_before
        )
        self.assertLessEqual(  # type: ignore[attr-defined]
            await count(
                hs,
                "SELECT COUNT(*) FROM state_groups_state WHERE state_group <= "
                f"{max(groups_before)}",
            ),
            rows_before,
        )
        # Synapse's own code answers every group as it did before reclaim.
        after = await native_group_digest(hs)
        self.assertEqual({g: after[g] for g in groups_before}, groups_before)  # type: ignore[attr-defined]
        forget_caches(hs, module)
        await compare_every_delta(self, hs)

    @in_logcontext
    async def test_a_group_whose_proof_fails_keeps_its_rows(self) -> None:
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=2)
        events_before = await event_digest(hs, history.rooms)
        groups = sorted(await module.store.known_groups(await all_groups(hs)))
        # Point one group at another group's snapshot: a mirror that went wrong.
        victim, other = groups[len(groups) // 2], groups[0]

        def corrupt_txn(txn: Any) -> None:
            txn.execute(
                "UPDATE nidstate_state_groups SET snapshot_nid ="
                " (SELECT snapshot_nid FROM nidstate_state_groups WHERE state_group = ?)"
                " WHERE state_group = ?",
                (other, victim),
            )

        await module.store.db_pool.runInteraction("corrupt", corrupt_txn)
        module.store.clear_caches()
        victim_rows = await count(
            hs, f"SELECT COUNT(*) FROM state_groups_state WHERE state_group = {victim}"
        )
        totals = await module.reclaimer.run()
        self.assertEqual(totals.refused, 1)  # type: ignore[attr-defined]
        self.assertEqual(module.stats.reclaim.groups_refused, 1)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, f"SELECT COUNT(*) FROM state_groups_state WHERE state_group = {victim}"),
            victim_rows,
        )
        self.assertGreater(totals.groups, len(groups) // 2)  # type: ignore[attr-defined]
        # The groups built on it were proved through its rows, and reclaimed.
        # Put the mirror right: every event answers as before again.
        def repair_txn(txn: Any) -> None:
            txn.execute("DELETE FROM nidstate_state_groups WHERE state_group = ?", (victim,))

        await module.store.db_pool.runInteraction("repair", repair_txn)
        forget_caches(hs, module)
        digest = await event_digest(hs, history.rooms)
        self.assertEqual(digest, events_before)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_a_corrupted_block_delta_row_or_edge_is_refused(self) -> None:
        """Each group proved by its delta when it can: a block of its own
        changed (with a matching hash), one of its rows changed, its edge
        moved to another group, or a row of a group stored in full (proved in
        NIDs) changed makes Synapse's answer and the snapshot's differ,
        and its rows stay; every group reclaimed still answers what Synapse's
        rows answered before reclaim (whatever they had become)."""
        for corruption in ("block", "delta row", "edge", "full row"):
            hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
            module = self.module(hs)  # type: ignore[attr-defined]
            await build_history(hs, messages_per_room=2)
            victim = await corrupt(hs, corruption)
            module.store.clear_caches()
            truth = await native_group_digest(hs)
            rows = await count(
                hs, f"SELECT COUNT(*) FROM state_groups_state WHERE state_group = {victim}"
            )
            totals = await module.reclaimer.run()
            self.assertGreater(totals.refused, 0, corruption)  # type: ignore[attr-defined]
            self.assertGreater(totals.by_delta, 0, corruption)  # type: ignore[attr-defined]
            self.assertEqual(  # type: ignore[attr-defined]
                await count(
                    hs, f"SELECT COUNT(*) FROM state_groups_state WHERE state_group = {victim}"
                ),
                rows,
                corruption,
            )
            self.assertEqual(  # type: ignore[attr-defined]
                await count(
                    hs, f"SELECT COUNT(*) FROM nidstate_reclaimed_groups WHERE state_group = {victim}"
                ),
                0,
            )
            # Synapse's answer from its rows, reclaimed groups from their snapshots
            # (what verify compares with; serve would read the corrupted mirror).
            forget_caches(hs, module)
            answer = await module.store.db_pool.runInteraction(
                "nidstate_test_synapse_states",
                module.store.synapse_states_txn,
                list(truth),
                StateFilter.all(),
            )
            self.assertEqual(  # type: ignore[attr-defined]
                {g: dict(state) for g, state in answer.items()}, truth, corruption
            )
            await self.stop_homeserver(hs)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_compactions_are_proved_in_nids(self) -> None:
        """With snapshots cut anew every few blocks (the 64-block limit lowered
        to 3), a group whose snapshot is a compaction is proved against its
        predecessor's snapshot and its rows, in NIDs; a row of one changed is
        refused, and every group reclaimed answers what Synapse's rows did."""
        from synapse_nidstate.algebra import state as algebra_state

        limit = algebra_state.MAX_BLOCKS
        algebra_state.MAX_BLOCKS = 3
        try:
            hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
            module = self.module(hs)  # type: ignore[attr-defined]
            await build_history(hs, messages_per_room=2)
        finally:
            algebra_state.MAX_BLOCKS = limit
        mirror = module.stats.mirror
        # Cut anew: compacted, or their last blocks merged with the change.
        self.assertGreaterEqual(mirror.compactions, 1)  # type: ignore[attr-defined]
        self.assertGreaterEqual(mirror.tail_merges, 1)  # type: ignore[attr-defined]
        self.assertGreaterEqual(mirror.compactions + mirror.tail_merges, 5)  # type: ignore[attr-defined]
        # Every group but the first of each room: by delta, or in NIDs.
        totals = await module.reclaimer.run()
        rooms = await count(hs, "SELECT COUNT(DISTINCT room_id) FROM state_groups")
        self.assertEqual(  # type: ignore[attr-defined]
            (totals.refused, totals.by_delta + totals.in_nids), (0, totals.groups)
        )
        # The first group of each room has no predecessor: its rows, in NIDs.
        self.assertGreaterEqual(totals.in_nids, rooms)  # type: ignore[attr-defined]
        await module.reclaimer.restore()
        # A row of a compaction changed: refused (and the groups after it that
        # keep its key), never deleted.
        victim = await corrupt(hs, "compaction row")
        module.store.clear_caches()
        truth = await native_group_digest(hs)
        totals = await module.reclaimer.run()
        self.assertGreater(totals.refused, 0)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, f"SELECT COUNT(*) FROM nidstate_reclaimed_groups WHERE state_group = {victim}"),
            0,
        )
        forget_caches(hs, module)
        answer = await module.store.db_pool.runInteraction(
            "nidstate_test_synapse_states",
            module.store.synapse_states_txn,
            list(truth),
            StateFilter.all(),
        )
        self.assertEqual({g: dict(state) for g, state in answer.items()}, truth)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_restore_clears_a_mark_synapse_left_behind_and_names_a_lost_snapshot(
        self,
    ) -> None:
        from synapse_nidstate.storage.reclaim import ReclaimError

        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        await module.reclaimer.run(history.rooms[0])
        groups = await all_groups(hs)
        room_nid = await count(hs, "SELECT MIN(room_nid) FROM nidstate_reclaimed_groups")

        def mark_txn(txn: Any, group: int) -> None:
            txn.execute(
                "INSERT INTO nidstate_reclaimed_groups (state_group, room_nid, rows_deleted)"
                " VALUES (?, ?, 0)",
                (group, room_nid),
            )

        # A group Synapse no longer has: its mark goes, restore completes.
        await module.store.db_pool.runInteraction("mark", mark_txn, max(groups) + 1000)
        await module.reclaimer.restore()
        self.assertEqual(await count(hs, "SELECT COUNT(*) FROM nidstate_reclaimed_groups"), 0)  # type: ignore[attr-defined]
        # A group Synapse has, without a snapshot: restore stops and names it.
        await module.reclaimer.run(history.rooms[0])
        unknown = sorted(set(groups) - set(await module.store.known_groups(groups)))[0]
        await module.store.db_pool.runInteraction("mark", mark_txn, unknown)
        with self.assertRaises(ReclaimError) as caught:  # type: ignore[attr-defined]
            await module.reclaimer.restore()
        self.assertIn(f"state group {unknown}", str(caught.exception))  # type: ignore[attr-defined]

    @in_logcontext
    async def test_a_synapse_upgrade_that_raises_its_compat_version(self) -> None:
        # Groups reclaimed, then Synapse upgraded to a release whose schema
        # raises schema_compat_version: it starts (the module hands it its own
        # compat version), writes the new one, and the marker is set again over
        # it in the same transaction; restore then gives Synapse the new one.
        from synapse.storage import prepare_database

        database = self.database_config()  # type: ignore[attr-defined]
        hs = await self.make_homeserver(SERVE, database=database)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        events_before = await event_digest(hs, history.rooms)
        compat_before = await count(hs, "SELECT compat_version FROM schema_compat_version")
        self.assertGreater((await self.module(hs).reclaimer.run()).groups, 0)  # type: ignore[attr-defined]
        await self.stop_homeserver(hs)  # type: ignore[attr-defined]

        upgraded = compat_before + 1
        self.assertLessEqual(upgraded, prepare_database.SCHEMA_VERSION)  # type: ignore[attr-defined]
        self.patch(prepare_database, "SCHEMA_COMPAT_VERSION", upgraded)  # type: ignore[attr-defined]
        hs = await self.make_homeserver(SERVE, database=database)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, "SELECT compat_version FROM schema_compat_version"),
            RECLAIMED_COMPAT_VERSION,
        )
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, f"SELECT value FROM nidstate_meta WHERE key = '{SAVED_COMPAT_KEY}'"),
            str(upgraded),
        )
        forget_caches(hs, module)
        self.assertEqual(await event_digest(hs, history.rooms), events_before)  # type: ignore[attr-defined]
        await module.reclaimer.restore()
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, "SELECT compat_version FROM schema_compat_version"), upgraded
        )

    @in_logcontext
    async def test_dry_run_deletes_nothing(self) -> None:
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        await build_history(hs, messages_per_room=1)
        rows = await count(hs, "SELECT COUNT(*) FROM state_groups_state")
        compat = await count(hs, "SELECT compat_version FROM schema_compat_version")
        totals = await module.reclaimer.run(dry_run=True)
        self.assertGreater(totals.groups, 0)  # type: ignore[attr-defined]
        self.assertEqual(await count(hs, "SELECT COUNT(*) FROM state_groups_state"), rows)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await count(hs, "SELECT compat_version FROM schema_compat_version"), compat
        )
        self.assertEqual(module.stats.reclaim.groups_reclaimed, 0)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_eager_leaves_almost_no_rows(self) -> None:
        hs = await self.make_homeserver(  # type: ignore[attr-defined]
            {"mode": "serve", "reclaim": {"eager": True}}
        )
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=3)
        stats = module.stats.reclaim
        self.assertGreater(stats.groups_reclaimed, 10)  # type: ignore[attr-defined]
        self.assertEqual(stats.groups_refused, 0)  # type: ignore[attr-defined]
        self.assertEqual(module.stats.mirror.write_failures, 0)  # type: ignore[attr-defined]
        groups = await all_groups(hs)
        with_rows = await count(
            hs, "SELECT COUNT(DISTINCT state_group) FROM state_groups_state"
        )
        known = await module.store.known_groups(groups)
        # Only groups without a snapshot keep rows.
        self.assertLessEqual(with_rows, len(groups) - len(known))  # type: ignore[attr-defined]
        filters = filters_for(hs, history.users)
        forget_caches(hs, module)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)

        # A reclaimed group's delta costs what Synapse's costs: one transaction
        # on a miss of Synapse's cache, none once the cache holds it (Synapse's
        # own tests count a createRoom's transactions).
        state = hs.get_datastores().state
        pool = module.store.db_pool
        reclaimed = await pool.runInteraction(
            "nidstate_test_reclaimed", module.store.reclaimed_anchors_txn, groups
        )
        with_edge = await pool.runInteraction(
            "nidstate_test_edges", module.store.prev_groups_txn, list(reclaimed)
        )
        self.assertGreater(len(with_edge), 10)  # type: ignore[attr-defined]
        forget_caches(hs, module)
        for group in with_edge:
            before = transactions()
            delta = await state.get_state_group_delta(group)
            self.assertEqual(transactions() - before, 1)  # type: ignore[attr-defined]
            self.assertEqual(delta.prev_group, with_edge[group])  # type: ignore[attr-defined]
            self.assertEqual(await state.get_state_group_delta(group), delta)  # type: ignore[attr-defined]
            self.assertEqual(transactions() - before, 1)  # type: ignore[attr-defined]
        await compare_every_delta(self, hs)

    @in_logcontext
    async def test_background_job(self) -> None:
        hs = await self.make_homeserver(  # type: ignore[attr-defined]
            {"mode": "serve", "reclaim": {"enabled": True, "interval_ms": 10, "batch_size": 5}}
        )
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=2)
        clock = hs.get_clock()
        from synapse.util.duration import Duration

        for _ in range(400):
            if await module.reclaimer.remaining() == 0:
                break
            await clock.sleep(Duration(milliseconds=20))
        self.assertEqual(await module.reclaimer.remaining(), 0)  # type: ignore[attr-defined]
        status = await module.reclaim_status()
        self.assertEqual(status["groups_left"], 0)  # type: ignore[attr-defined]
        self.assertGreater(status["groups_reclaimed"], 0)  # type: ignore[attr-defined]
        self.assertTrue(status["background"])  # type: ignore[attr-defined]
        forget_caches(hs, module)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters_for(hs, history.users))

    @in_logcontext
    async def test_modes_other_than_serve_are_refused_while_groups_are_reclaimed(self) -> None:
        from synapse.config._base import ConfigError

        database = self.database_config()  # type: ignore[attr-defined]
        hs = await self.make_homeserver(SERVE, database=database)  # type: ignore[attr-defined]
        await build_history(hs, messages_per_room=1)
        await self.module(hs).reclaimer.run()  # type: ignore[attr-defined]
        await self.stop_homeserver(hs)  # type: ignore[attr-defined]
        for mode in ("shadow", "mirror"):
            with self.assertRaises(ConfigError) as caught:  # type: ignore[attr-defined]
                await self.make_homeserver({"mode": mode}, database=database)  # type: ignore[attr-defined]
            self.assertIn("state groups are reclaimed", str(caught.exception))  # type: ignore[attr-defined]
            self.assertIn("synapse-nidstate restore", str(caught.exception))  # type: ignore[attr-defined]
        hs = await self.make_homeserver(SERVE, database=database)  # type: ignore[attr-defined]
        self.assertGreater(self.module(hs).reclaimed_at_start, 0)  # type: ignore[attr-defined]


    @in_logcontext
    async def test_a_separate_state_database_is_refused(self) -> None:
        """The proof and the deletion must be one transaction: with the state
        database apart from the main one (where the NID tables are) reclaim
        refuses, at start-up for the config and at run time for the command."""
        from synapse.config._base import ConfigError

        main, state = self.database_config(), self.database_config()  # type: ignore[attr-defined]
        main["data_stores"] = ["main"]
        state["data_stores"] = ["state"]
        split = {"databases": {"main": main, "state": state}}
        hs = await self.make_homeserver(SERVE, extra_config=split)  # type: ignore[attr-defined]
        reclaimer = self.module(hs).reclaimer  # type: ignore[attr-defined]
        # What the module runs at start-up with reclaim.enabled or eager set.
        with self.assertRaises(ConfigError) as caught:  # type: ignore[attr-defined]
            reclaimer.check_possible_at_start_up()
        self.assertIn("the state database is not the main database", str(caught.exception))  # type: ignore[attr-defined]
        await build_history(hs, messages_per_room=1)
        with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
            await reclaimer.run()


class SqliteReclaimTests(ReclaimTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresReclaimTests(ReclaimTests, HomeserverTestCase):
    engine = "postgres"
