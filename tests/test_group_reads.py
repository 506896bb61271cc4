"""Synapse's reads of state groups answered from the NID tables, on both engines.

Every group of the test histories is read with every filter the issue names and
40 random ones, through the wrapped ``_get_state_groups_from_groups_txn`` and
through Synapse's own (the class's method, unwrapped), in one transaction.
"""

from synapse.server import HomeServer
from synapse.storage.databases.state.bg_updates import StateGroupBackgroundUpdateStore
from synapse.types.state import StateFilter

from synapse_nidstate.demo.history import HistoryShape, realistic_history
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import build_history, filters_for, random_filters, room_event_ids


def _selects_nothing(state_filter: StateFilter) -> bool:
    return not state_filter.include_others and not any(
        keys is None or keys for keys in state_filter.types.values()
    )


async def all_groups(hs: HomeServer) -> list[int]:
    rows = await hs.get_datastores().state.db_pool.simple_select_list(
        "state_groups", None, ("id",), desc="nidstate_test_groups"
    )
    return sorted(row[0] for row in rows)


class GroupReadTests:
    async def _compare_every_group(
        self, hs: HomeServer, filters: dict[str, StateFilter]
    ) -> int:
        """The wrapped read against Synapse's for every group and filter; the count."""
        state = hs.get_datastores().state
        groups = await all_groups(hs)
        compared = 0
        for name, state_filter in filters.items():
            if _selects_nothing(state_filter):
                # Synapse never sends these to the database (its PostgreSQL
                # query would be empty SQL); the module answers {} for them.
                continue
            for chunk in (groups[i : i + 50] for i in range(0, len(groups), 50)):

                def both(txn, chunk=chunk, state_filter=state_filter):  # type: ignore[no-untyped-def]
                    ours = state._get_state_groups_from_groups_txn(txn, chunk, state_filter)
                    theirs = StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn(
                        state, txn, chunk, state_filter
                    )
                    return ours, theirs

                ours, theirs = await state.db_pool.runInteraction("nidstate_test_both", both)
                self.assertEqual(set(ours), set(chunk), name)  # type: ignore[attr-defined]
                for group in chunk:
                    self.assertEqual(  # type: ignore[attr-defined]
                        dict(ours[group]), dict(theirs[group]), f"group {group}, filter {name}"
                    )
                    compared += 1
        return compared

    @in_logcontext
    async def test_serve_every_group_every_filter(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        self.assertTrue(module.serves_group_reads)  # type: ignore[attr-defined]
        history = await build_history(hs)
        filters = {**filters_for(hs, history.users), **random_filters(history.users, 40, 11)}
        served, fallback = module.stats.group_reads.served, module.stats.group_reads.fallback
        compared = await self._compare_every_group(hs, filters)
        self.assertGreater(compared, 1000)  # type: ignore[attr-defined]
        stats = module.stats.group_reads
        # Groups the mirror has a snapshot for are served; the others (groups
        # no event maps to, which the mirror never needed) are Synapse's.
        groups = await all_groups(hs)
        known = await module.store.known_groups(groups)
        self.assertGreater(len(known), 0.9 * len(groups))  # type: ignore[attr-defined]
        unknown = len(groups) - len(known)
        asked = sum(1 for f in filters.values() if not _selects_nothing(f))
        self.assertEqual(stats.fallback - fallback, unknown * asked)  # type: ignore[attr-defined]
        self.assertEqual(stats.served - served, len(known) * asked)  # type: ignore[attr-defined]

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
        await self._compare_every_group(hs, filters)
        stats = module.stats.group_reads
        self.assertEqual(stats.mismatched, 0)  # type: ignore[attr-defined]
        self.assertEqual(stats.served, 0)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_groups_from_before_the_module_fall_back_until_migrated(self) -> None:
        database = self.database_config()  # type: ignore[attr-defined]
        hs = await self.make_homeserver(None, database=database)  # type: ignore[attr-defined]
        history = await build_history(hs, messages_per_room=1)
        await self.stop_homeserver(hs)  # type: ignore[attr-defined]
        hs = await self.make_homeserver({"mode": "serve"}, database=database)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        filters = filters_for(hs, history.users)
        await self._compare_every_group(hs, filters)
        self.assertGreater(module.stats.group_reads.fallback, 0)  # type: ignore[attr-defined]
        await module.migrator.run()
        before = module.stats.group_reads.served
        await self._compare_every_group(hs, filters)
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
