"""State-at-event lookups answered from the NID tables.

These replace ``StateStorageController.get_state_ids_for_events`` and
``get_state_for_events`` on the instance (see :mod:`synapse_nidstate.runtime.hooks`),
so every caller in Synapse reaches them, and they answer exactly as those
methods do: the state after each event (before it, for a rejected event),
filtered by the ``StateFilter``, as strings, in the order of ``event_ids``,
raising like Synapse for outliers and unknown events.

Events the mirror has no snapshot for are answered by Synapse's own methods,
per event, so a request mixing both still gets every event's right answer. A
read of the mirror that fails is answered by Synapse too, for every event of
the request, or fails loudly where Synapse's rows are reclaimed
(``runtime.faults``).
"""

import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING

from synapse.events import EventBase
from synapse.logging.opentracing import tag_args, trace
from synapse.storage.controllers.state import StateStorageController
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter
from synapse.util.cancellation import cancellable
from twisted.internet.defer import CancelledError

from synapse_nidstate.runtime.faults import FaultLog, StateUnavailable
from synapse_nidstate.runtime.metrics import LOOKUP_SECONDS, LookupStats
from synapse_nidstate.storage import NidStore

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_nidstate.runtime.group_reads import GroupReads

logger = logging.getLogger(__name__)

NativeStateIds = Callable[..., Awaitable[dict[str, StateMap[str]]]]

#: Mismatches logged in full at most this often per process (then only counted).
MAX_LOGGED_MISMATCHES = 100


class StateLookups:
    def __init__(
        self,
        controller: StateStorageController,
        store: NidStore,
        stats: LookupStats,
        mode: str,
        native_state_ids: NativeStateIds,
        server_name: str = "",
        faults: FaultLog | None = None,
    ) -> None:
        self._controller = controller
        self._faults = faults if faults is not None else FaultLog()
        self._mirror_seconds = LOOKUP_SECONDS.labels(server_name, "mirror")
        self._native_seconds = LOOKUP_SECONDS.labels(server_name, "native")
        self._store = store
        self._stats = stats
        self._mode = mode
        self._native_state_ids = native_state_ids
        #: Set by the module when it serves state-group reads too: Synapse's own
        #: answer (``native_state_ids``) then bypasses them.
        self.group_reads: GroupReads | None = None

    @property
    def store(self) -> NidStore:
        return self._store

    def clear_caches(self, hs: "HomeServer") -> None:
        """Empty both sides' state-at-event caches: Synapse's (its state groups,
        their members and deltas, event -> group) and the module's."""
        stores = hs.get_datastores()
        stores.state._state_group_cache.invalidate_all()
        stores.state._state_group_members_cache.invalidate_all()
        stores.state.get_state_group_delta.invalidate_all()
        stores.main._get_state_group_for_event.invalidate_all()
        self._store.clear_caches()

    async def check_timeable(self) -> None:
        """Before timing Synapse alone (``native_state_ids(alone=True)``):
        ``GroupReads.check_timeable``."""
        if self.group_reads is not None:
            await self.group_reads.check_timeable()

    async def native_state_ids(
        self,
        event_ids: Collection[str],
        state_filter: StateFilter,
        await_full_state: bool = True,
        *,
        fresh: bool = True,
        alone: bool = False,
    ) -> dict[str, StateMap[str]]:
        """Synapse's own answer from its state groups, whatever the mode: the
        module's state-group reads are bypassed meanwhile and, with ``fresh``
        (comparisons), Synapse's per-group caches emptied first; timings pass
        ``fresh=False, alone=True`` (``GroupReads.native_only``)."""
        guard = (
            self.group_reads.native_only(fresh, alone)
            if self.group_reads is not None
            else contextlib.nullcontext()
        )
        with self._native_seconds.time(), guard:
            return await self._native_state_ids(event_ids, state_filter, await_full_state)

    async def mirrored_state_ids(
        self, event_ids: Collection[str], state_filter: StateFilter
    ) -> dict[str, MutableStateMap[str]]:
        """The mirror's answer for the events it has a snapshot for (others left out)."""
        with self._mirror_seconds.time():
            cached = self._store.cached_state_for_events(event_ids, state_filter)
            if cached is not None:
                return cached
            # One transaction, not autocommit: on PostgreSQL (Synapse's
            # REPEATABLE READ) every statement of the read then sees the same
            # snapshot of the tables, so a purge or reclaim committing between
            # two of them cannot leave a snapshot whose blocks are gone. (SQLite:
            # Synapse's one connection runs one transaction at a time.)
            invalidations = self._store.invalidations
            answer = await self._store.db_pool.runInteraction(
                "nidstate_get_state_for_events",
                self._store.state_for_events_txn,
                event_ids,
                state_filter,
            )
            self._store.forget_if_invalidated_since(invalidations)
            return answer

    # Synapse's own decorators, so that a trace shows the same spans and tags
    # (compat.REQUIREMENTS checks that a replaced method is traced as Synapse's is).
    @trace
    @tag_args
    @cancellable
    async def get_state_ids_for_events(
        self,
        event_ids: Collection[str],
        state_filter: StateFilter | None = None,
        await_full_state: bool = True,
    ) -> dict[str, StateMap[str]]:
        """Replacement of ``StateStorageController.get_state_ids_for_events``."""
        if state_filter is None:
            state_filter = StateFilter.all()
        if self._mode == "shadow":
            return await self._shadow(event_ids, state_filter, await_full_state)

        # Keep Synapse's meaning of await_full_state (faster joins): wait until
        # the events' state is complete unless the filter can do with partial
        # state. Partial-state events have no snapshot, so they fall back.
        if await_full_state and state_filter.must_await_full_state(
            self._controller._is_mine_id
        ):
            await self._controller._partial_state_events_tracker.await_full_state(
                event_ids
            )
        try:
            served: dict[str, StateMap[str]] = dict(
                await self.mirrored_state_ids(event_ids, state_filter)
            )
        except CancelledError:
            raise
        except Exception as e:
            return await self._after_failure(e, event_ids, state_filter, await_full_state)
        missing = [e for e in event_ids if e not in served]
        self._stats.served += len(event_ids) - len(missing)
        if missing:
            self._stats.fallback += len(missing)
            with self._native_seconds.time():
                served.update(
                    await self._native_state_ids(missing, state_filter, await_full_state)
                )
        return {event_id: served[event_id] for event_id in event_ids}

    async def _after_failure(
        self,
        error: Exception,
        event_ids: Collection[str],
        state_filter: StateFilter,
        await_full_state: bool,
    ) -> dict[str, StateMap[str]]:
        """The mirror's read failed: Synapse's answer for every event, its
        state-group reads Synapse's own meanwhile (``native_only``), where a
        reclaimed group's state comes from its proved snapshot or the request
        fails with ``StateUnavailable`` (``runtime.faults``)."""
        self._faults.report(f"the state at {len(event_ids)} events", error, fallback=True)
        try:
            answer = await self.native_state_ids(
                event_ids, state_filter, await_full_state, fresh=False
            )
        except StateUnavailable:
            self._stats.unavailable += len(event_ids)
            raise
        self._stats.failed += len(event_ids)
        return answer

    async def _shadow(
        self,
        event_ids: Collection[str],
        state_filter: StateFilter,
        await_full_state: bool,
    ) -> dict[str, StateMap[str]]:
        """Answer with Synapse's own lookup; compare with the mirror's where it has one."""
        with self._native_seconds.time():
            native = await self._native_state_ids(event_ids, state_filter, await_full_state)
        try:
            mirrored = await self.mirrored_state_ids(event_ids, state_filter)
        except CancelledError:
            raise
        except Exception as e:
            self._faults.report(f"the state at {len(event_ids)} events", e, fallback=True)
            self._stats.failed += len(event_ids)
            return native
        self._stats.fallback += len(set(event_ids) - mirrored.keys())
        for event_id, state in mirrored.items():
            self._stats.compared += 1
            if state != native[event_id]:
                self._stats.mismatched += 1
                if self._stats.mismatched <= MAX_LOGGED_MISMATCHES:
                    differing = sorted(
                        key
                        for key in state.keys() | native[event_id].keys()
                        if state.get(key) != native[event_id].get(key)
                    )
                    logger.error(
                        "synapse-nidstate: state at %s differs from Synapse's for %s "
                        "(filter %s)",
                        event_id,
                        differing,
                        state_filter,
                    )
        return native

    @trace
    @tag_args
    async def get_state_for_events(
        self, event_ids: Collection[str], state_filter: StateFilter | None = None
    ) -> dict[str, StateMap[EventBase]]:
        """Replacement of ``StateStorageController.get_state_for_events``.

        Synapse's own method with the ids lookup above: same waiting for full
        state (decided by the filter), same dropping of state events it cannot
        load.
        """
        if state_filter is None:
            state_filter = StateFilter.all()
        state_ids = await self.get_state_ids_for_events(event_ids, state_filter)
        state_events = await self._controller.stores.main.get_events(
            [e for ids in state_ids.values() for e in ids.values()],
            get_prev_content=False,
        )
        return {
            event_id: {k: state_events[e] for k, e in ids.items() if e in state_events}
            for event_id, ids in state_ids.items()
        }
