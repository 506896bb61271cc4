"""Where Synapse calls us: every Synapse method the module wraps, in one place.

Synapse has no public persistence hook (``on_new_event`` runs after the fact,
outside the transaction, and misses backfill, outliers and rejections), so the
module wraps private methods on the *instances* Synapse built. Callers look
these methods up on the instance at call time, so every caller reaches the
wrappers. The signatures wrapped here are those of the Synapse releases in
``config.TESTED_SYNAPSE``.

Write side (only in a process that persists events):

* ``PersistEventsStore._persist_events_and_state_updates`` (async, before the
  transaction): plan the snapshots of the batch's state groups.
* ``PersistEventsStore._store_event_state_mappings_txn`` (inside the
  ``persist_events`` transaction, for new and de-outliered events, right after
  Synapse writes ``event_to_state_groups``): write them.

* ``StateGroupWorkerStore.update_state_for_partial_state_event`` (async,
  then its transaction ``_update_state_for_partial_state_event_txn``, wherever
  Synapse un-partial-states an event after a faster join): plan, then give the
  event the snapshot of its full state group in the same transaction. Before
  that, a partial-state event has no snapshot and its lookups fall back.

Read side (every process): ``StateStorageController.get_state_ids_for_events``
and ``get_state_for_events``, through which the single-event forms and every
state-at-event caller (visibility, /context, /messages, /members, sync,
federation /state) go.

State-group reads (every process, where the state database is the main one):
``StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn``, the
recursive read of ``state_groups_state`` behind every read of a state group's
state (``_get_state_for_groups``, ``store_state_group``'s read of the
predecessor, purge's de-delta, the deduplication background update), and
``StateGroupDataStore.get_state_group_delta`` (one edge's delta): Synapse's
cache in front, a miss read in one transaction that also answers a reclaimed
group from the snapshots (serve), or compared (shadow), see ``group_reads``.
And ``StateGroupDataStore._get_state_for_groups`` is replaced, so that in
serve the module's caches stand in for Synapse's per-group caches
(``group_caches``); elsewhere it is Synapse's own.

Start-up (every process that loads the module, and the CLI):
``prepare_database._upgrade_existing_database``, where Synapse refuses a
database whose ``schema_compat_version`` is newer than it: while state groups
are reclaimed that value is the module's marker, and the wrapper gives Synapse
the version it had (see ``failsafe``, which installs it from ``parse_config``,
before Synapse prepares its database).

Schema (in-memory SQLite only, as in Synapse's own test harness):
``SQLite3Engine.on_new_connection`` rebuilds Synapse's schema on every new
connection to ``:memory:``, each a new database; ``storage.schema`` wraps it to
create the module's tables there too (a file or PostgreSQL needs no wrapper).
"""

import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from synapse.types import StateMap

from synapse_nidstate.runtime.group_caches import GroupCaches
from synapse_nidstate.runtime.group_reads import GroupReads
from synapse_nidstate.runtime.lookups import StateLookups
from synapse_nidstate.runtime.mirror import BatchPlan, Mirror
from synapse_nidstate.storage import NidStore, arguments_by_name

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


def install_mirror(hs: "HomeServer", mirror: Mirror) -> bool:
    """Wrap the persistence of events; False if this process persists none."""
    persist_store = hs.get_datastores().persist_events
    if persist_store is None:
        return False

    persist_batch = persist_store._persist_events_and_state_updates
    store_mappings_txn = persist_store._store_event_state_mappings_txn
    batch_arguments = arguments_by_name(persist_batch)
    mappings_arguments = arguments_by_name(store_mappings_txn)

    @functools.wraps(persist_batch)
    async def _persist_events_and_state_updates(*args: Any, **kwargs: Any) -> None:
        named = batch_arguments(args, kwargs)
        room_id, events_and_contexts = named["room_id"], named["events_and_contexts"]
        plan = await mirror.prepare(room_id, events_and_contexts)
        owned = mirror.begin_batch(room_id, plan)
        try:
            await persist_batch(*args, **kwargs)
        finally:
            if owned:
                mirror.end_batch(room_id)

    @functools.wraps(store_mappings_txn)
    def _store_event_state_mappings_txn(*args: Any, **kwargs: Any) -> None:
        store_mappings_txn(*args, **kwargs)
        named = mappings_arguments(args, kwargs)
        mirror.write_txn(named["txn"], named["events_and_contexts"])

    persist_store._persist_events_and_state_updates = _persist_events_and_state_updates  # type: ignore[method-assign]
    persist_store._store_event_state_mappings_txn = _store_event_state_mappings_txn  # type: ignore[method-assign]
    return True


def install_full_state_updates(hs: "HomeServer", mirror: Mirror) -> None:
    """Follow Synapse moving partial-state events to their full state (faster joins)."""
    main = hs.get_datastores().main
    update = main.update_state_for_partial_state_event
    update_txn = main._update_state_for_partial_state_event_txn
    update_arguments = arguments_by_name(update)
    update_txn_arguments = arguments_by_name(update_txn)
    # event_id -> plan, from the async half to its transaction.
    plans: dict[str, BatchPlan] = {}

    @functools.wraps(update)
    async def update_state_for_partial_state_event(*args: Any, **kwargs: Any) -> None:
        named = update_arguments(args, kwargs)
        event, context = named["event"], named["context"]
        plans[event.event_id] = await mirror.prepare_full_state(event, context)
        try:
            await update(*args, **kwargs)
        finally:
            plans.pop(event.event_id, None)

    @functools.wraps(update_txn)
    def _update_state_for_partial_state_event_txn(*args: Any, **kwargs: Any) -> None:
        update_txn(*args, **kwargs)
        named = update_txn_arguments(args, kwargs)
        event = named["event"]
        mirror.write_full_state_txn(
            named["txn"], event, named["context"], plans.get(event.event_id, BatchPlan([]))
        )

    main.update_state_for_partial_state_event = update_state_for_partial_state_event  # type: ignore[method-assign]
    main._update_state_for_partial_state_event_txn = _update_state_for_partial_state_event_txn  # type: ignore[method-assign]


def install_lookups(hs: "HomeServer", lookups: StateLookups) -> None:
    """Route Synapse's state-at-event lookups through the mirror."""
    controller = hs.get_storage_controllers().state
    controller.get_state_ids_for_events = lookups.get_state_ids_for_events  # type: ignore[method-assign]
    controller.get_state_for_events = lookups.get_state_for_events  # type: ignore[method-assign]


def install_group_reads(hs: "HomeServer", group_reads: GroupReads) -> bool:
    """Route Synapse's reads of state groups through the mirror; False where the
    state database is not the main one (the NID tables are in main)."""
    state = hs.get_datastores().state
    if state.db_pool is not hs.get_datastores().main.db_pool:
        return False
    native = state._get_state_groups_from_groups_txn
    read_arguments = arguments_by_name(native)

    @functools.wraps(native)
    def _get_state_groups_from_groups_txn(*args: Any, **kwargs: Any) -> Mapping[int, StateMap[str]]:
        named = read_arguments(args, kwargs)
        txn, groups = named.pop("txn"), named.pop("groups")
        state_filter = named.pop("state_filter", None)
        # What else Synapse passed goes on to its own read of the groups not served.
        read = functools.partial(native, **named) if named else native
        return group_reads.read_txn(txn, groups, state_filter, read)

    native_delta = state.get_state_group_delta
    delta_arguments = arguments_by_name(native_delta)

    # ``wraps`` also copies the cache's ``invalidate``/``invalidate_all``: callers
    # (replication, our timings) find them where Synapse put them.
    @functools.wraps(native_delta)
    async def get_state_group_delta(*args: Any, **kwargs: Any) -> Any:
        state_group = delta_arguments(args, kwargs)["state_group"]
        return await group_reads.get_state_group_delta(state_group, native_delta)  # type: ignore[arg-type]

    caches = GroupCaches(group_reads, state, state._get_state_for_groups, native)
    state._get_state_groups_from_groups_txn = _get_state_groups_from_groups_txn  # type: ignore[method-assign]
    state._get_state_for_groups = caches._get_state_for_groups  # type: ignore[method-assign]
    state.get_state_group_delta = get_state_group_delta  # type: ignore[method-assign,assignment]
    group_reads.installed(state)
    return True


def install_purges(hs: "HomeServer", store: NidStore) -> None:
    """Follow Synapse's purges, on whichever process runs them.

    * ``PurgeEventsStore._purge_room_txn`` (purge/delete room; Synapse runs it
      twice): in the same transaction, every row of the room goes.
    * ``StateGroupDataStore.purge_unreferenced_state_groups`` (state database,
      maybe another one): afterwards, the mapping of the groups it deleted goes.

    Then the room's snapshots and blocks nothing uses any more are deleted.
    A purge of history needs nothing more: Synapse deletes the purged events'
    ``event_to_state_groups`` rows, through which the lookups find a snapshot.

    * ``CacheInvalidationWorkerStore._invalidate_caches_for_room_events`` (every
      process, from the purging one or from replication): the event ->
      snapshot cache is emptied, as Synapse empties its event -> state group one.
    """
    main = hs.get_datastores().main
    state = hs.get_datastores().state
    purge_room_txn = main._purge_room_txn
    purge_groups = state.purge_unreferenced_state_groups

    purge_room_arguments = arguments_by_name(purge_room_txn)
    purge_groups_arguments = arguments_by_name(purge_groups)

    @functools.wraps(purge_room_txn)
    def _purge_room_txn(*args: Any, **kwargs: Any) -> Any:
        result = purge_room_txn(*args, **kwargs)
        named = purge_room_arguments(args, kwargs)
        store.purge_room_txn(named["txn"], named["room_id"])
        return result

    @functools.wraps(purge_groups)
    async def purge_unreferenced_state_groups(*args: Any, **kwargs: Any) -> Any:
        deleted_any = await purge_groups(*args, **kwargs)
        named = purge_groups_arguments(args, kwargs)
        room_id = named["room_id"]
        if deleted_any:
            candidates = list(named["state_groups_to_sequence_numbers"])
            existing = await state.db_pool.simple_select_many_batch(
                "state_groups", "id", candidates, ("id",), desc="nidstate_existing_groups"
            )
            gone = set(candidates) - {row[0] for row in existing}
            if gone:
                await store.db_pool.runInteraction(
                    "nidstate_forget_state_groups", store.forget_state_groups_txn, room_id, gone
                )
        return deleted_any

    # Every process, when a purge in a room is streamed to it (or made here):
    # Synapse forgets its event -> state group cache; the mirror forgets its
    # event -> snapshot one, so no worker answers for a purged event.
    invalidate_room_events = main._invalidate_caches_for_room_events

    @functools.wraps(invalidate_room_events)
    def _invalidate_caches_for_room_events(*args: Any, **kwargs: Any) -> Any:
        result = invalidate_room_events(*args, **kwargs)
        store.forget_event_snapshots()
        return result

    main._invalidate_caches_for_room_events = _invalidate_caches_for_room_events  # type: ignore[method-assign]
    main._purge_room_txn = _purge_room_txn  # type: ignore[method-assign]
    state.purge_unreferenced_state_groups = purge_unreferenced_state_groups  # type: ignore[method-assign]
