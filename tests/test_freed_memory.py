"""The memory a big read leaves freed, given back to the system
(runtime/freed_memory.py): after a whole read of a big state, once however
many such reads end together; never after a narrow one; not when
``trim_freed_memory: false``. glibc's own ``malloc_trim`` runs: the suite runs
on glibc."""

from synapse.api.constants import EventTypes
from synapse.logging.context import make_deferred_yieldable
from synapse.types.state import StateFilter
from twisted.internet import reactor
from twisted.internet.task import deferLater

from synapse_nidstate.runtime.freed_memory import DELAY
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import room_event_ids
from tests.test_block_strings import big_room
from tests.test_reclaim import SERVE, forget_caches


async def wait(seconds: float) -> None:
    # Yieldable: a bare deferLater would leave this test's logcontext current
    # while the reactor runs Synapse's looping calls meanwhile (which assert
    # they start in the sentinel context: the test failed now and then).
    await make_deferred_yieldable(deferLater(reactor, seconds, lambda: None))


class FreedMemoryTests(HomeserverTestCase):
    @in_logcontext
    async def test_released_after_big_reads_once(self) -> None:
        hs = await self.make_homeserver(SERVE)
        module = self.module(hs)
        freed = module.freed_memory
        self.assertTrue(freed.available)
        _, _, room_id = await big_room(hs)
        event_ids, _ = await room_event_ids(hs, room_id)
        # The room's whole state is 150-odd entries: "big" for this test.
        module.store.BIG_READ_ENTRIES = 100  # type: ignore[misc]
        await wait(DELAY + 0.5)  # whatever the writes kicked is done
        before = freed.releases

        # A narrow read, however cold, releases nothing.
        forget_caches(hs, module)
        member = StateFilter.from_types([(EventTypes.Member, "@alice:test")])
        await module.lookups.mirrored_state_ids(event_ids[-1:], member)
        await wait(DELAY + 0.5)
        self.assertEqual(freed.releases, before)

        # Two whole reads in a row (each cold): one release, after them.
        for event_id in event_ids[-2:]:
            forget_caches(hs, module)
            state = await module.lookups.mirrored_state_ids([event_id], StateFilter.all())
            self.assertGreaterEqual(len(state[event_id]), 100)
        self.assertEqual(freed.releases, before)
        for _ in range(40):
            if freed.releases > before:
                break
            await wait(0.1)
        await wait(0.3)
        self.assertEqual(freed.releases, before + 1)

        # The same read from the resolved-state cache builds nothing: no release.
        await module.lookups.mirrored_state_ids(event_ids[-1:], StateFilter.all())
        await wait(DELAY + 0.5)
        self.assertEqual(freed.releases, before + 1)

    @in_logcontext
    async def test_off(self) -> None:
        hs = await self.make_homeserver({**SERVE, "trim_freed_memory": False})
        module = self.module(hs)
        self.assertIsNone(module.store.after_big_read)
        _, _, room_id = await big_room(hs)
        event_ids, _ = await room_event_ids(hs, room_id)
        module.store.BIG_READ_ENTRIES = 1  # type: ignore[misc]
        forget_caches(hs, module)
        await module.lookups.mirrored_state_ids(event_ids[-1:], StateFilter.all())
        await wait(DELAY + 0.5)
        self.assertEqual(module.freed_memory.releases, 0)
