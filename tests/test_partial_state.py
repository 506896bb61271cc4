"""Partial-state events (faster joins): never answered from the mirror until
Synapse gives them their full state; then mirrored, in the same transaction.
Reclaim leaves the room alone until then.

The event is built by Synapse's event-creation handler and its context by
Synapse's state handler, with a partial ``state_ids_before_event`` and
``partial_state=True``, the way the federation code computes the context of
an event received during a faster join; it is persisted through Synapse's
persistence controller (which records it in ``partial_state_events``). The
un-partial-stating is Synapse's own ``update_state_for_partial_state_event``
with a context computed from the full state, as ``FederationEventHandler``
does after the room's state resync.
"""

from synapse.api.constants import EventTypes
from synapse.types import create_requester
from synapse.types.state import StateFilter

from synapse_nidstate.demo.history import Driver, _event_dict
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import build_history, filters_for


class PartialStateTests:
    @in_logcontext
    async def test_partial_state_event_falls_back_until_full_state(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        history = await build_history(hs)
        module = self.module(hs)
        room_id = history.rooms[0]
        owner = history.users[0]
        controller = hs.get_storage_controllers().state
        store = hs.get_datastores().main
        state_handler = hs.get_state_handler()

        # The full state now, and a partial one without some members (what a
        # faster join hands over: the critical state, not every membership).
        full = await controller.get_current_state_ids(room_id)
        members = sorted(k for k in full if k[0] == EventTypes.Member and k[1] != owner)
        self.assertGreater(len(members), 1)
        partial = {k: v for k, v in full.items() if k not in members[:-1]}

        # Synapse records a faster join by marking the room partial-state.
        await store.store_partial_state_room(
            room_id,
            {"remote.example.org"},
            store.get_device_stream_token().stream,
            "remote.example.org",
        )
        creator = hs.get_event_creation_handler()
        event, _ = await creator.create_event(
            create_requester(owner),
            _event_dict(owner, room_id, EventTypes.Topic, {"topic": "partial"}, ""),
        )
        context = await state_handler.compute_event_context(
            event, state_ids_before_event=partial, partial_state=True
        )
        self.assertTrue(context.partial_state)
        persistence = hs.get_storage_controllers().persistence
        assert persistence is not None
        await persistence.persist_event(event, context)
        self.assertTrue(await store.is_partial_state_event(event.event_id))

        filters = filters_for(hs, history.users)
        native = module.lookups.native_state_ids
        fallback_before = module.stats.lookups.fallback
        for state_filter in filters.values():
            # The mirror has nothing for it...
            self.assertEqual(
                await module.lookups.mirrored_state_ids([event.event_id], state_filter), {}
            )
            # ...so Synapse answers (here its partial state, as it would natively).
            self.assertEqual(
                await controller.get_state_ids_for_events(
                    [event.event_id], state_filter, await_full_state=False
                ),
                await native([event.event_id], state_filter, False),
            )
        self.assertEqual(module.stats.lookups.fallback - fallback_before, len(filters))
        # Reclaim leaves a room in partial state alone, even its mirrored groups.
        self.assertEqual((await module.reclaimer.run(room_id)).groups, 0)

        # Synapse resyncs the room's state and gives the event its full state.
        full_context = await state_handler.compute_event_context(
            event, state_ids_before_event=full, partial_state=False
        )
        await store.update_state_for_partial_state_event(event, full_context)
        self.assertFalse(await store.is_partial_state_event(event.event_id))
        self.assertIsNotNone(await store.clear_partial_state_room(room_id))

        served_before = module.stats.lookups.served
        for state_filter in filters.values():
            mirrored = await module.lookups.mirrored_state_ids([event.event_id], state_filter)
            self.assertEqual(mirrored, await native([event.event_id], state_filter))
            self.assertEqual(
                await controller.get_state_ids_for_events([event.event_id], state_filter),
                mirrored,
            )
        self.assertEqual(module.stats.lookups.served - served_before, len(filters))
        # The full state has every member the partial one lacked.
        state = (await module.lookups.mirrored_state_ids([event.event_id], StateFilter.all()))[event.event_id]
        for key in members:
            self.assertIn(key, state)
        self.assertEqual(module.stats.mirror.write_failures, 0)

        # Once the room has its full state, its groups are reclaimed, and every
        # answer stays Synapse's.
        totals = await module.reclaimer.run(room_id)
        self.assertGreater(totals.groups, 0)
        self.assertEqual(totals.refused, 0)
        module.store.clear_caches()
        for state_filter in filters.values():
            self.assertEqual(
                await controller.get_state_ids_for_events([event.event_id], state_filter),
                await native([event.event_id], state_filter),
            )

        # And a later event in the room is mirrored as usual.
        later = await Driver(hs).message(owner, room_id, "after the resync")
        self.assertEqual(
            await module.lookups.mirrored_state_ids([later.event_id], StateFilter.all()),
            await native([later.event_id], StateFilter.all()),
        )


class PartialStateSQLiteTests(PartialStateTests, HomeserverTestCase):
    engine = "sqlite"


class PartialStatePostgresTests(PartialStateTests, HomeserverTestCase):
    engine = "postgres"
