"""Synapse's reads of state groups answered from the NID tables, on both engines.

Every group of the test histories is read with every filter the issue names and
40 random ones, through the wrapped ``_get_state_groups_from_groups_txn`` and
through Synapse's own (the class's method, unwrapped), in one transaction.
"""

from typing import Any

from synapse.types.state import StateFilter

from synapse_nidstate.demo.history import HistoryShape, realistic_history
from tests.harness import HomeserverTestCase, SqlStatements, in_logcontext
from tests.scenarios import (
    all_groups,
    build_history,
    compare_every_delta,
    compare_every_group,
    filters_for,
    random_filters,
    room_event_ids,
    selects_nothing,
)


class GroupReadTests:
    @in_logcontext
    async def test_serve_every_group_every_filter(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        self.assertTrue(module.serves_group_reads)  # type: ignore[attr-defined]
        history = await build_history(hs)
        filters = {**filters_for(hs, history.users), **random_filters(history.users, 40, 11)}
        served, fallback = module.stats.group_reads.served, module.stats.group_reads.fallback
        compared = await compare_every_group(self, hs, filters)
        self.assertGreater(compared, 1000)  # type: ignore[attr-defined]
        stats = module.stats.group_reads
        # Every group is served: from its snapshot, or (groups no event maps to,
        # which the mirror never needed) through its chain to one with a snapshot.
        groups = await all_groups(hs)
        known = await module.store.known_groups(groups)
        self.assertGreater(len(known), 0.9 * len(groups))  # type: ignore[attr-defined]
        self.assertLess(len(known), len(groups))  # type: ignore[attr-defined]
        asked = sum(1 for f in filters.values() if not selects_nothing(f))
        self.assertEqual(stats.fallback - fallback, 0)  # type: ignore[attr-defined]
        self.assertEqual(stats.served - served, len(groups) * asked)  # type: ignore[attr-defined]
        # One edge's delta, for every group, as Synapse answers it (from its rows,
        # which are there: nothing is reclaimed).
        self.assertEqual(await compare_every_delta(self, hs), len(groups))  # type: ignore[attr-defined]

    @in_logcontext
    async def test_shadow_counts_no_mismatch_over_a_realistic_history(self) -> None:
        hs = await self.make_homeserver({"mode": "shadow"})  # type: ignore[attr-defined]
        shape = HistoryShape(
            rooms=3, events=600, big_room_members=40, small_room_members=6, seed=5
        )
        rooms = await realistic_history(hs, shape)
        users = sorted(await hs.get_datastores().main.get_users_in_room(rooms[0]))
        module = self.module(hs)  # type: ignore[attr-defined]
        # Synapse's own reads while it wrote the history were compared.
        self.assertGreater(module.stats.group_reads.compared, 0)  # type: ignore[attr-defined]
        filters = {**filters_for(hs, users), **random_filters(users, 10, 3)}
        await compare_every_group(self, hs, filters)
        await compare_every_delta(self, hs)
        stats = module.stats.group_reads
        self.assertEqual(stats.mismatched, 0)  # type: ignore[attr-defined]
        self.assertEqual(stats.served, 0)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_a_group_without_snapshot_is_read_through_its_chain(self) -> None:
        """Groups Synapse stores without an event the mirror sees (as while an event
        is being persisted), two deep on top of a mirrored one: read through their
        delta chain to the mirrored group, as Synapse reads them."""
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        room_id = history.rooms[0]
        state = hs.get_datastores().state
        event_ids, _ = await room_event_ids(hs, room_id)
        base = (await hs.get_datastores().main._get_state_group_for_events([event_ids[-1]]))[
            event_ids[-1]
        ]
        self.assertIn(base, await module.store.known_groups([base]))  # type: ignore[attr-defined]
        topic = await state.store_state_group(
            "$nidstate-test-1", room_id, base, {("m.room.topic", ""): event_ids[0]}, None
        )
        name = await state.store_state_group(
            "$nidstate-test-2", room_id, topic, {("m.room.name", "x"): event_ids[1]}, None
        )
        self.assertEqual(await module.store.known_groups([topic, name]), {})  # type: ignore[attr-defined]
        filters = {**filters_for(hs, history.users), **random_filters(history.users, 10, 4)}
        served, fallback = module.stats.group_reads.served, module.stats.group_reads.fallback
        await compare_every_group(self, hs, filters)
        self.assertEqual(module.stats.group_reads.fallback, fallback)  # type: ignore[attr-defined]
        self.assertGreater(module.stats.group_reads.served, served)  # type: ignore[attr-defined]
        await compare_every_delta(self, hs)

    @in_logcontext
    async def test_a_chain_is_walked_as_far_as_the_short_walk_goes(self) -> None:
        """Six groups without a snapshot, each on the one before, on a mirrored
        group: while nothing is reclaimed the walk goes SHORT_WALK_HOPS hops, so
        the first four are served through their chain and the two beyond are
        Synapse's (all answered as Synapse answers)."""
        from synapse_nidstate.storage.groups import SHORT_WALK_HOPS

        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        room_id = history.rooms[0]
        state = hs.get_datastores().state
        event_ids, _ = await room_event_ids(hs, room_id)
        group = (await hs.get_datastores().main._get_state_group_for_events([event_ids[-1]]))[
            event_ids[-1]
        ]
        chain = []
        for i in range(SHORT_WALK_HOPS + 2):
            group = await state.store_state_group(
                f"$nidstate-chain-{i}", room_id, group,
                {("m.room.topic", ""): event_ids[i % len(event_ids)]}, None,
            )
            chain.append(group)
        stats = module.stats.group_reads
        outcomes = []
        for group in chain:
            served, fallback = stats.served, stats.fallback

            def both(txn: Any, group: int = group) -> Any:
                ours = state._get_state_groups_from_groups_txn(txn, [group], StateFilter.all())
                theirs = module.group_reads.synapse_answer_txn(
                    txn, [group], StateFilter.all(),
                    lambda t, g, f: type(state)._get_state_groups_from_groups_txn(state, t, g, f),
                )
                return ours, theirs

            ours, theirs = await state.db_pool.runInteraction("nidstate_test_chain", both)
            self.assertEqual(dict(ours[group]), dict(theirs[group]))  # type: ignore[attr-defined]
            outcomes.append((stats.served - served, stats.fallback - fallback))
        self.assertEqual(  # type: ignore[attr-defined]
            outcomes, [(1, 0)] * SHORT_WALK_HOPS + [(0, 1)] * 2
        )

    @in_logcontext
    async def test_groups_from_before_the_module_fall_back_until_migrated(self) -> None:
        database = self.database_config()  # type: ignore[attr-defined]
        hs = await self.make_homeserver(None, database=database)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        await self.stop_homeserver(hs)  # type: ignore[attr-defined]
        hs = await self.make_homeserver({"mode": "serve"}, database=database)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        filters = filters_for(hs, history.users)
        await compare_every_group(self, hs, filters)
        self.assertGreater(module.stats.group_reads.fallback, 0)  # type: ignore[attr-defined]
        await module.migrator.run()
        before = module.stats.group_reads.served
        await compare_every_group(self, hs, filters)
        self.assertGreater(module.stats.group_reads.served, before)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_synapses_own_answer_never_sees_the_mirror(self) -> None:
        """What verify, the demo and the timings call Synapse's answer bypasses the
        module's group reads (and Synapse's caches they filled), then restores them."""
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        event_ids, _ = await room_event_ids(hs, history.rooms[0])
        stats = module.stats.group_reads
        served = stats.served
        await module.lookups.native_state_ids(event_ids, StateFilter.all())
        self.assertEqual(stats.served, served)  # type: ignore[attr-defined]
        # Afterwards Synapse's reads are served again.
        state = hs.get_datastores().state
        state._state_group_cache.invalidate_all()
        state._state_group_members_cache.invalidate_all()
        await state._get_state_for_groups(await all_groups(hs), StateFilter.all())
        self.assertGreater(stats.served, served)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_the_modules_caches_stand_in_for_synapses(self) -> None:
        """In serve, ``_get_state_for_groups`` answers a group that has a
        snapshot from the module's caches once read (no transaction) and never
        keeps it in Synapse's per-group caches, not even a group Synapse stored
        in full (which ``store_state_group`` puts there itself); a group without
        a snapshot is kept there, as Synapse keeps it."""
        from synapse.storage.databases.state.bg_updates import StateGroupBackgroundUpdateStore

        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        state = hs.get_datastores().state
        event_ids, _ = await room_event_ids(hs, history.rooms[0])
        base = (await hs.get_datastores().main._get_state_group_for_events([event_ids[-1]]))[
            event_ids[-1]
        ]
        unmirrored = await state.store_state_group(
            "$nidstate-test-1", history.rooms[0], base, {("m.room.topic", ""): event_ids[0]}, None
        )
        groups = await all_groups(hs)
        # Groups no event maps to (as ``unmirrored``) have no snapshot.
        without_snapshot = set(groups) - set(await module.store.known_groups(groups))
        self.assertIn(unmirrored, without_snapshot)  # type: ignore[attr-defined]
        self.assertLess(len(without_snapshot), len(groups) / 10)  # type: ignore[attr-defined]
        synapses = (state._state_group_cache, state._state_group_members_cache)

        def kept_by_synapse() -> set[int]:
            entries = [(g, c.get(g)) for g in groups for c in synapses]
            return {g for g, e in entries if e.full or e.value or e.known_absent}

        self.assertEqual(kept_by_synapse(), set())  # type: ignore[attr-defined]

        def native(txn: Any, chunk: list[int], f: StateFilter) -> Any:
            return StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn(
                state, txn, chunk, f
            )

        interactions = 0
        run_interaction = state.db_pool.runInteraction

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal interactions
            interactions += 1
            return await run_interaction(*args, **kwargs)

        state.db_pool.runInteraction = counted  # type: ignore[method-assign]
        # (Synapse's own PostgreSQL read fails on a filter that selects nothing.)
        filters = {n: f for n, f in filters_for(hs, history.users).items() if not selects_nothing(f)}
        for name, state_filter in filters.items():
            answer = await state._get_state_for_groups(groups, state_filter)
            expected = await run_interaction(
                "nidstate_test_native",
                module.group_reads.synapse_answer_txn,
                groups,
                state_filter,
                native,
            )
            for group in groups:
                self.assertEqual(  # type: ignore[attr-defined]
                    answer[group], dict(expected[group]), f"group {group}, filter {name}"
                )
        self.assertGreater(interactions, 0)  # type: ignore[attr-defined]
        self.assertEqual(kept_by_synapse(), without_snapshot)  # type: ignore[attr-defined]
        # Read again: every answer from a cache, no transaction.
        interactions = 0
        for name, state_filter in filters.items():
            again = await state._get_state_for_groups(groups, state_filter)
            self.assertEqual(set(again), set(groups), name)  # type: ignore[attr-defined]
        self.assertEqual(interactions, 0)  # type: ignore[attr-defined]
        # From cold, one group with a snapshot: the group's snapshot and block
        # list (and the filter's NIDs), its blocks, their strings; no savepoint
        # in the module's own transaction.
        group = max(set(groups) - without_snapshot)
        for name, state_filter in filters.items():
            module.store.clear_caches()
            with SqlStatements() as statements:
                await state._get_state_for_groups([group], state_filter)
            # (Synapse's own statements, as its statement timeout or a
            # background update running meanwhile, left out; so is a PREPARE,
            # once per connection on PostgreSQL: storage/prepared.py.)
            ours = [
                sql
                for sql in statements.sql
                if ("nidstate_" in sql or "SAVEPOINT" in sql) and not sql.startswith("PREPARE ")
            ]
            self.assertLessEqual(len(ours), 3, (name, ours))  # type: ignore[attr-defined]

    @in_logcontext
    async def test_what_synapses_caches_answer_needs_no_read(self) -> None:
        """A group Synapse keeps in its own caches is answered from them, as
        Synapse answers it, also a group with no state at all (the one before
        a room's create event: its entries have size 0, so the caches' size
        says nothing of whether they hold it), and so is any group asked with a
        filter that wants nothing, while the caches hold no entry."""
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        state = hs.get_datastores().state
        event_ids, _ = await room_event_ids(hs, history.rooms[0])
        empty = await state.store_state_group("$nidstate-test-empty", history.rooms[0], None, None, {})
        self.assertEqual(state._state_group_cache.cache.len(), 0)  # type: ignore[attr-defined]
        interactions = 0
        run_interaction = state.db_pool.runInteraction

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal interactions
            interactions += 1
            return await run_interaction(*args, **kwargs)

        state.db_pool.runInteraction = counted  # type: ignore[method-assign]
        for state_filter in (StateFilter.all(), StateFilter.from_types([("m.room.create", "")])):
            self.assertEqual(  # type: ignore[attr-defined]
                await state._get_state_for_groups([empty], state_filter), {empty: {}}
            )
        self.assertEqual(interactions, 0)  # type: ignore[attr-defined]
        state._state_group_cache.invalidate_all()
        state._state_group_members_cache.invalidate_all()
        group = (await hs.get_datastores().main._get_state_group_for_events([event_ids[-1]]))[
            event_ids[-1]
        ]
        module = self.module(hs)  # type: ignore[attr-defined]
        module.store.clear_caches()
        wants_nothing = StateFilter.from_types([])
        self.assertEqual(  # type: ignore[attr-defined]
            await state._get_state_for_groups([group, empty], wants_nothing), {group: {}, empty: {}}
        )
        self.assertEqual(interactions, 0)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_split_state_database_is_left_to_synapse(self) -> None:
        main, state = self.database_config(), self.database_config()  # type: ignore[attr-defined]
        main["data_stores"] = ["main"]
        state["data_stores"] = ["state"]
        hs = await self.make_homeserver(  # type: ignore[attr-defined]
            {"mode": "serve"}, extra_config={"databases": {"main": main, "state": state}}
        )
        module = self.module(hs)  # type: ignore[attr-defined]
        self.assertFalse(module.serves_group_reads)  # type: ignore[attr-defined]
        await build_history(hs, messages_per_room=1)
        self.assertEqual(module.stats.group_reads.served, 0)  # type: ignore[attr-defined]
        self.assertEqual(module.stats.group_reads.fallback, 0)  # type: ignore[attr-defined]


class SqliteGroupReadTests(GroupReadTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresGroupReadTests(GroupReadTests, HomeserverTestCase):
    engine = "postgres"
