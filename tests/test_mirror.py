"""The mirror against Synapse's native state, for every event and filter, on both engines."""

import random
from typing import Any

from synapse.api.constants import EventTypes
from synapse.types.state import StateFilter

from synapse_nidstate import algebra
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.storage import ResolvedChanges, ResolvedState
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import (
    build_history,
    compare_room,
    filters_for,
    random_filters,
    room_event_ids,
)


class MirrorTests:
    """Shared by the SQLite and PostgreSQL classes below."""

    @in_logcontext
    async def test_every_event_every_filter(self) -> None:
        hs = await self.make_homeserver({"mode": "shadow"})
        history = await build_history(hs)
        filters = filters_for(hs, history.users)
        compared = 0
        for room_id in history.rooms:
            compared += await compare_room(self, hs, room_id, filters)
        self.assertGreater(compared, 300)
        stats = self.module(hs).stats
        self.assertEqual(stats.mirror.unprepared, 0)
        self.assertEqual(stats.mirror.plan_failures, 0)
        self.assertEqual(stats.mirror.write_failures, 0)
        # Only the empty state before each m.room.create is read in full.
        self.assertEqual(stats.mirror.full_state_reads, len(history.rooms))
        # Shadow mode: Synapse's lookups answer natively and are compared.
        controller = hs.get_storage_controllers().state
        for room_id in history.rooms:
            event_ids, _ = await room_event_ids(hs, room_id)
            for state_filter in filters.values():
                await controller.get_state_ids_for_events(event_ids, state_filter)
        self.assertGreaterEqual(stats.lookups.compared, compared)
        self.assertEqual(stats.lookups.mismatched, 0)
        self.assertEqual(stats.lookups.served, 0)

    @in_logcontext
    async def test_serve_mode_answers_from_the_mirror(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        history = await build_history(hs)
        module = self.module(hs)
        controller = hs.get_storage_controllers().state
        native = module.lookups.native_state_ids
        filters = filters_for(hs, history.users)
        outliers_asked = 0
        for room_id in history.rooms:
            event_ids, outliers = await room_event_ids(hs, room_id)
            outliers_asked += len(outliers)
            served_before = module.stats.lookups.served
            for state_filter in filters.values():
                self.assertEqual(
                    await controller.get_state_ids_for_events(event_ids, state_filter),
                    await native(event_ids, state_filter),
                )
                # The single-event form goes through the replacement too.
                last = event_ids[-1]
                self.assertEqual(
                    await controller.get_state_ids_for_event(last, state_filter),
                    (await native([last], state_filter))[last],
                )
            self.assertGreaterEqual(
                module.stats.lookups.served - served_before,
                len(filters) * (len(event_ids) + 1),
            )
            # Full events, as /context and visibility filtering ask for them.
            events = await controller.get_state_for_events(event_ids)
            for event_id in event_ids:
                state = await native([event_id], StateFilter.all())
                self.assertEqual(
                    {k: e.event_id for k, e in events[event_id].items()}, state[event_id]
                )
            # Outliers have no state: Synapse raises, and so do we, alike.
            for outlier in outliers:
                with self.assertRaises(Exception) as native_error:
                    await native([outlier], StateFilter.all())
                with self.assertRaises(type(native_error.exception)):
                    await controller.get_state_ids_for_events([outlier])
        # Only the outliers were answered (by raising) by Synapse's own code.
        self.assertEqual(module.stats.lookups.fallback, outliers_asked)

    @in_logcontext
    async def test_rejected_and_forked_events(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        history = await build_history(hs)
        controller = hs.get_storage_controllers().state
        store = hs.get_datastores().main
        for event_id in history.rejected:
            event = await store.get_event(event_id, allow_rejected=True)
            self.assertIsNotNone(event.rejected_reason)
            state = await controller.get_state_ids_for_event(event_id)
            if event.is_state():
                # State at a rejected event is the state before it.
                self.assertNotEqual(state.get((event.type, event.state_key)), event_id)
        left, right = history.forks
        for event_id in history.forks:
            state = await controller.get_state_ids_for_event(event_id)
            self.assertEqual(
                state[(EventTypes.Topic if event_id == left else EventTypes.Name, "")],
                event_id,
            )
        # The merge sees both sides of the fork.
        event_ids, _ = await room_event_ids(hs, history.rooms[1])
        merged = await controller.get_state_ids_for_event(event_ids[-1])
        self.assertEqual(merged[(EventTypes.Topic, "")], left)
        self.assertEqual(merged[(EventTypes.Name, "")], right)

    @in_logcontext
    async def test_events_before_the_module_fall_back(self) -> None:
        # Written with the module off, then served with it on: every answer is
        # still right, from Synapse's own tables.
        database = self.database_config()
        hs = await self.make_homeserver(None, database=database)
        history = await build_history(hs)
        await self.stop_homeserver(hs)
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        module = self.module(hs)
        controller = hs.get_storage_controllers().state
        old_ids, _ = await room_event_ids(hs, history.rooms[0])
        d = Driver(hs)
        new = await d.message(history.users[0], history.rooms[0], "after enabling")
        answers = await controller.get_state_ids_for_events(old_ids + [new.event_id])
        expected = await module.lookups.native_state_ids(
            old_ids + [new.event_id], StateFilter.all()
        )
        self.assertEqual(answers, expected)
        # The mirror answers for an event through its state group: the new
        # message's group (built now) is shared by the old events after the
        # room's last state change; every other old event falls back.
        group_of = await hs.get_datastores().main._get_state_group_for_events(old_ids)
        mirrored = await module.store.known_groups(group_of.values())
        sharing = [e for e, g in group_of.items() if g in mirrored]
        self.assertTrue(0 < len(sharing) < len(old_ids), (len(sharing), len(old_ids)))
        self.assertEqual(module.stats.lookups.fallback, len(old_ids) - len(sharing))
        self.assertGreaterEqual(module.stats.lookups.served, 1 + len(sharing))


    @in_logcontext
    async def test_split_state_database(self) -> None:
        # State groups in a second database (`data_stores: [state]`): the
        # mirror reads them through Synapse's state store and lives in main.
        main, state = self.database_config(), self.database_config()
        main["data_stores"] = ["main"]
        state["data_stores"] = ["state"]
        hs = await self.make_homeserver(
            {"mode": "serve"}, extra_config={"databases": {"main": main, "state": state}}
        )
        stores = hs.get_datastores()
        self.assertIsNot(stores.main.db_pool, stores.state.db_pool)
        history = await build_history(hs)
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)
        self.assertEqual(self.module(hs).stats.mirror.unprepared, 0)

    @in_logcontext
    async def test_split_state_database_migration(self) -> None:
        # History written with the module off on a split deployment, then
        # migrated: the migration reads state groups through the state store.
        main, state = self.database_config(), self.database_config()
        main["data_stores"] = ["main"]
        state["data_stores"] = ["state"]
        databases = {"databases": {"main": main, "state": state}}
        hs = await self.make_homeserver(None, extra_config=databases)
        history = await build_history(hs)
        await self.stop_homeserver(hs)
        hs = await self.make_homeserver({"mode": "serve"}, extra_config=databases)
        module = self.module(hs)
        self.assertGreater(await module.migrator.remaining(), 0)
        await module.migrator.run()
        self.assertEqual(await module.migrator.remaining(), 0)
        self.assertGreater(module.stats.migration.events_migrated, 0)
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            self.assertGreater(await compare_room(self, hs, room_id, filters), 0)

    @in_logcontext
    async def test_narrow_lookups_are_then_answered_from_the_caches(self) -> None:
        # Concrete keys and lazy-loading fill the per-snapshot member and
        # non-member caches (Synapse's rules): asked again, or asked for a
        # subset, they are answered without the database, and still exactly.
        hs = await self.make_homeserver({"mode": "serve"})
        history = await build_history(hs)
        module = self.module(hs)
        native = module.lookups.native_state_ids
        users = history.users
        narrow = {
            name: f
            for name, f in filters_for(hs, users).items()
            if name in ("none", "lazy_load", "include_others", "one_member", "history_visibility")
        }
        narrow["two_members"] = StateFilter.from_types(
            [(EventTypes.Member, users[0]), (EventTypes.Member, users[3])]
        )
        narrow["unknown_member"] = StateFilter.from_types([(EventTypes.Member, "@no:where")])
        rng = random.Random(7)
        for room_id in history.rooms:
            event_ids, _ = await room_event_ids(hs, room_id)
            module.store.clear_caches()
            names = sorted(narrow)
            for round_ in range(2):
                rng.shuffle(names)
                for name in names:
                    expected = await native(event_ids, narrow[name])
                    cached = module.store.cached_state_for_events(event_ids, narrow[name])
                    if round_ == 0 and cached is None:
                        mirrored = await module.lookups.mirrored_state_ids(
                            event_ids, narrow[name]
                        )
                        self.assertEqual(mirrored, expected, name)
                        cached = module.store.cached_state_for_events(event_ids, narrow[name])
                    self.assertIsNotNone(cached, f"{name} not answered from the caches")
                    self.assertEqual(cached, expected, name)
            # The whole state was never resolved for these.
            self.assertEqual(len(module.store._resolved), 0)

    @in_logcontext
    async def test_random_filters(self) -> None:
        # Filters drawn at random (seeded) over the types and keys the rooms
        # hold, plus unknown ones: concrete keys, wildcards, empty key sets,
        # include_others, all built with Synapse's StateFilter.
        hs = await self.make_homeserver({"mode": "shadow"})
        history = await build_history(hs, messages_per_room=1)
        filters = random_filters(history.users, 40, 20261127)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)


    @in_logcontext
    async def test_long_state_chain_compacts(self) -> None:
        # More state changes than a snapshot holds blocks: the mirror compacts
        # at the 64-block limit, and every answer stays exact.
        hs = await self.make_homeserver({"mode": "serve"})
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "private_chat")
        for i in range(75):
            await d.send(alice, room_id, EventTypes.Topic, {"topic": f"topic {i}"}, "")
            if i % 10 == 0:
                await d.message(alice, room_id, f"message {i}")
        stats = self.module(hs).stats.mirror
        self.assertGreaterEqual(stats.compactions, 1)
        await compare_room(self, hs, room_id, filters_for(hs, [alice, alice, alice]))

    @in_logcontext
    async def test_narrow_cold_lookups_read_only_the_blocks_holding_their_keys(self) -> None:
        # A state of 400 keys of one type, compacted into blocks of disjoint key
        # ranges, then changed key by key (delta blocks): a cold lookup of one
        # member, or of the history visibility, reads the blocks whose stored
        # range holds a wanted key and none of the others, and answers as
        # Synapse. (Lazy-loading members wants every non-member key too: here,
        # all 400, so it reads nearly every block; it must still be exact.)
        hs = await self.make_homeserver({"mode": "serve"})
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "private_chat")
        for i in range(400):
            await d.send(alice, room_id, "x.custom", {"i": i}, f"key {i}")
        module = self.module(hs)
        self.assertGreaterEqual(module.stats.mirror.compactions, 1)
        self.assertGreaterEqual(
            module.stats.mirror.compactions + module.stats.mirror.tail_merges, 2
        )
        event_ids, _ = await room_event_ids(hs, room_id)
        latest = event_ids[-1:]

        reads: list[tuple[int, int]] = []  # (blocks asked for, blocks read)
        blocks_txn = module.store._narrow_blocks_txn

        def counting(txn, learnt, block_lists, key_ranges, keys=None):  # type: ignore[no-untyped-def]
            found = blocks_txn(txn, learnt, block_lists, key_ranges, keys)
            reads.append((len({b for nids in block_lists.values() for b in nids}), len(found)))
            return found

        self.patch(module.store, "_narrow_blocks_txn", counting)
        filters = filters_for(hs, [alice, alice, alice])
        for name in ("one_member", "history_visibility", "lazy_load"):
            module.store.clear_caches()
            reads.clear()
            expected = await module.lookups.native_state_ids(latest, filters[name])
            mirrored = await module.lookups.mirrored_state_ids(latest, filters[name])
            self.assertEqual(mirrored, expected, name)
            [(asked, read)] = reads
            self.assertGreater(asked, 10, name)
            if name != "lazy_load":
                self.assertLess(read, asked // 4, name)  # not one delta block of x.custom
        # A cold narrow read keeps its snapshot's block ranges as one entry;
        # with them the same read, its answer dropped, needs no transaction:
        # the blocks it needs are cached, the others hold no key it wants.
        module.store.clear_caches()
        expected = await module.lookups.native_state_ids(latest, filters["one_member"])
        module.store.clear_caches()
        await module.lookups.mirrored_state_ids(latest, filters["one_member"])
        self.assertEqual(_with_ranges(module.store), 1)
        module.store._split.invalidate_all()
        self.assertEqual(
            module.store.cached_state_for_events(latest, filters["one_member"]), expected
        )
        # Read in one batch with it, a snapshot whose blocks' ranges all come
        # with the latest's entry (its list a prefix of the latest's) gets an
        # entry of its own, and is then read from the caches as well.
        lists = await block_lists(hs, event_ids)
        before = next(
            e for e, f in zip(reversed(event_ids[:-1]), reversed(event_ids))
            if lists[e] != lists[f] and lists[f][: len(lists[e])] == lists[e]
        )
        expected = await module.lookups.native_state_ids([before], filters["one_member"])
        module.store._split.invalidate_all()
        await module.lookups.mirrored_state_ids([before, *latest], filters["one_member"])
        self.assertEqual(_with_ranges(module.store), 2)
        module.store._split.invalidate_all()
        self.assertEqual(
            module.store.cached_state_for_events([before], filters["one_member"]), expected
        )
        # Every event and filter, cold, still exact (whole states read every block).
        module.store.clear_caches()
        await compare_room(self, hs, room_id, filters)

    @in_logcontext
    async def test_block_lists_are_cached_by_the_blocks_they_list(self) -> None:
        # The block list cache is bounded by the blocks its lists hold
        # (``block_list_cache_size``), not by snapshots; the event -> snapshot
        # cache keeps the caller's event IDs, not copies from the rows.
        hs = await self.make_homeserver({"mode": "serve", "block_list_cache_size": 40})
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "private_chat")
        for i in range(150):
            await d.send(alice, room_id, "x.custom", {"i": i}, f"key {i}")
        module = self.module(hs)
        event_ids, _ = await room_event_ids(hs, room_id)
        module.store.clear_caches()
        one_member = filters_for(hs, [alice, alice, alice])["one_member"]
        asked = ["".join(e) for e in event_ids[-40:]]  # new objects, equal to the events'
        for event_id in asked:
            await module.lookups.mirrored_state_ids([event_id], one_member)
        lists = module.store._snapshot_blocks
        listed = [len(node.value[0]) for node in lists.cache.values()]
        self.assertGreater(len(set(map(len, (await block_lists(hs, event_ids)).values()))), 1)
        self.assertEqual(len(lists), sum(listed))
        self.assertLessEqual(len(lists), lists.max_size)
        # Scaled as Synapse scales its own caches (README, the cache sizes).
        self.assertEqual(lists.max_size, int(40 * hs.config.caches.global_factor))
        self.assertLess(len(listed), len({*module.store._event_snapshots.cache.keys()}))
        given = {id(e) for e in asked}
        self.assertTrue(all(id(e) in given for e in module.store._event_snapshots.cache))

    @in_logcontext
    async def test_snapshots_between_compactions_share_one_resolved_state(self) -> None:
        # A snapshot extends its parent by one block until the next compaction:
        # the resolved-state cache keeps one whole state per compaction and each
        # other snapshot's changes against it, whether the states are read in
        # one batch, oldest first (a cached parent to build on) or newest first
        # (none: kept against a base it shares its first blocks with); every
        # answer exact.
        hs = await self.make_homeserver({"mode": "serve"})
        module = self.module(hs)
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "public_chat")
        for i in range(40):
            user = await d.register(f"user{i}")
            await d.membership(user, user, room_id, "join")
        for i in range(75):
            await d.send(alice, room_id, EventTypes.Topic, {"topic": f"topic {i}"}, "")
        self.assertGreaterEqual(module.stats.mirror.compactions, 1)
        event_ids, _ = await room_event_ids(hs, room_id)
        native = module.lookups.native_state_ids
        expected = await native(event_ids, StateFilter.all())
        one_member = StateFilter.from_types([(EventTypes.Member, alice)])
        lookups = module.lookups
        for order in ("batch", "oldest first", "newest first"):
            module.store.clear_caches()
            if order == "batch":
                answers = await lookups.mirrored_state_ids(event_ids, StateFilter.all())
            else:
                answers = {}
                ordered = event_ids if order == "oldest first" else event_ids[::-1]
                for event_id in ordered:
                    answers.update(
                        await lookups.mirrored_state_ids([event_id], StateFilter.all())
                    )
            self.assertEqual(answers, expected, order)
            # Narrower filters from the same cached entries.
            self.assertEqual(
                module.store.cached_state_for_events(event_ids, one_member),
                await native(event_ids, one_member),
                order,
            )
            cached = [
                module.store._resolved.get(s) for s in list(module.store._resolved.cache)
            ]
            bases = [c for c in cached if isinstance(c, ResolvedState)]
            changes = [c for c in cached if isinstance(c, ResolvedChanges)]
            # Newest first, no parent is cached before its child: each is
            # kept as its changes against the base it shares its first blocks with.
            self.assertGreater(len(changes), 40, order)
            # A base per compaction and per quarter the state grew by.
            self.assertLess(len(bases), len(changes) / 10, order)
            whole = sum(len(expected[e]) for e in event_ids if e in answers)
            # The cache weighs entries: a whole state its size, changes theirs.
            self.assertLess(len(module.store._resolved), whole / 5, order)

    @in_logcontext
    async def test_warm_lookups_do_not_touch_the_database(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        history = await build_history(hs, messages_per_room=1)
        module = self.module(hs)
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)  # fills the caches
        db_pool = module.store.db_pool
        original = db_pool.runInteraction
        reads: list[str] = []

        def counting(desc, func, *args, **kwargs):  # type: ignore[no-untyped-def]
            if desc.startswith("nidstate_get_state"):
                reads.append(f"{desc} {args[1]}")  # the filter
            return original(desc, func, *args, **kwargs)

        db_pool.runInteraction = counting  # type: ignore[method-assign]
        try:
            # The same answers again, from the caches alone.
            for room_id in history.rooms:
                await compare_room(self, hs, room_id, filters)
        finally:
            db_pool.runInteraction = original  # type: ignore[method-assign]
        self.assertEqual(reads, [])

    @in_logcontext
    async def test_answers_are_the_callers_own(self) -> None:
        # Events of one snapshot get one state each, never a cache's: a
        # caller that changes one changes nothing else, cold or warm.
        hs = await self.make_homeserver({"mode": "serve"})
        module = self.module(hs)
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "public_chat")
        first = await d.message(alice, room_id, "one")
        second = await d.message(alice, room_id, "two")
        events = [first.event_id, second.event_id]
        for state_filter in (
            StateFilter.all(),
            StateFilter.from_types([(EventTypes.Member, alice)]),
        ):
            module.store.clear_caches()
            for _ in ("cold", "warm"):
                answer = await module.lookups.mirrored_state_ids(events, state_filter)
                expected = dict(answer[second.event_id])
                self.assertIsNot(answer[first.event_id], answer[second.event_id])
                answer[first.event_id].clear()
                self.assertEqual(answer[second.event_id], expected)
                again = await module.lookups.mirrored_state_ids(events, state_filter)
                self.assertEqual(again, {e: expected for e in events})


class SqliteMirrorTests(MirrorTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresMirrorTests(MirrorTests, HomeserverTestCase):
    engine = "postgres"


async def block_lists(hs: Any, event_ids: list[str]) -> dict[str, tuple[int, ...]]:
    """Each event's snapshot's block list, from the tables."""

    def read_txn(txn: Any) -> dict[str, tuple[int, ...]]:
        txn.execute(
            "SELECT esg.event_id, s.block_nids FROM event_to_state_groups AS esg"
            " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
            " JOIN nidstate_snapshots AS s ON s.snapshot_nid = g.snapshot_nid"
        )
        return {e: tuple(algebra.unpack_nids(b)) for e, b in txn.fetchall() if e in wanted}

    wanted = set(event_ids)
    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_lists", read_txn)


def _with_ranges(store: Any) -> int:
    """How many snapshots' block lists are cached with their blocks' key ranges."""
    return sum(1 for node in store._snapshot_blocks.cache.values() if node.value[1] is not None)
