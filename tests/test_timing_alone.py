"""Timings of Synapse alone (``GroupReads.native_only(alone=True)``): Synapse's
statements and no statement of the module's, refused where groups are reclaimed."""

from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.types.state import StateFilter

from tests.harness import HomeserverTestCase, SqlStatements, in_logcontext
from tests.scenarios import all_groups, build_history
from tests.test_reclaim import SERVE


async def history_group(hs: HomeServer) -> tuple[int, StateFilter]:
    """The newest state group the mirror has a snapshot of, and a filter of
    one member's key (the cold read of three statements)."""
    history = await build_history(hs, messages_per_room=1)
    module = HomeserverTestCase.module(hs)
    groups = await all_groups(hs)
    known = await module.store.known_groups(groups)
    return max(known), StateFilter.from_types([(EventTypes.Member, history.users[1])])


async def synapse_answer(hs: HomeServer, group: int, state_filter: StateFilter) -> dict:
    module = HomeserverTestCase.module(hs)
    with module.group_reads.native_only(fresh=True):
        answer = await hs.get_datastores().state._get_state_for_groups([group], state_filter)
    return dict(answer[group])


class SynapseAloneTests:
    @in_logcontext
    async def test_synapse_alone_runs_no_statement_of_the_module(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        group_reads = self.module(hs).group_reads  # type: ignore[attr-defined]
        group, state_filter = await history_group(hs)
        expected = await synapse_answer(hs, group, state_filter)
        with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
            with group_reads.native_only(fresh=True, alone=True):
                pass
        await group_reads.check_timeable()
        state = hs.get_datastores().state
        with SqlStatements() as statements, group_reads.native_only(fresh=True, alone=True):
            answer = await state._get_state_for_groups([group], state_filter)
            delta = await state.get_state_group_delta(group)  # type: ignore[call-arg, arg-type, misc]
        self.assertEqual(dict(answer[group]), expected)  # type: ignore[attr-defined]
        self.assertIsNotNone(delta.prev_group)  # type: ignore[attr-defined]
        self.assertTrue(statements.sql)  # type: ignore[attr-defined]
        ours = [s for s in statements.sql if "nidstate_" in s or "schema_compat_version" in s]
        self.assertEqual(ours, [])  # type: ignore[attr-defined]

    @in_logcontext
    async def test_refused_where_groups_are_reclaimed(self) -> None:
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        await build_history(hs, messages_per_room=1)
        self.assertGreater((await module.reclaimer.run()).groups, 0)  # type: ignore[attr-defined]
        with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
            await module.group_reads.check_timeable()


class SynapseAloneSQLiteTests(SynapseAloneTests, HomeserverTestCase):
    engine = "sqlite"


class SynapseAlonePostgresTests(SynapseAloneTests, HomeserverTestCase):
    engine = "postgres"
