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

Read side (every process): ``StateStorageController.get_state_ids_for_events``
and ``get_state_for_events``, through which the single-event forms and every
state-at-event caller (visibility, /context, /messages, /members, sync,
federation /state) go.
"""

import functools
import logging
from typing import TYPE_CHECKING, Any

from synapse.storage.database import LoggingTransaction

from synapse_nidstate.lookups import StateLookups
from synapse_nidstate.mirror import Mirror

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

    @functools.wraps(persist_batch)
    async def _persist_events_and_state_updates(
        room_id: str, events_and_contexts: list, **kwargs: Any
    ) -> None:
        plan = await mirror.prepare(room_id, events_and_contexts)
        owned = mirror.begin_batch(room_id, plan)
        try:
            await persist_batch(room_id, events_and_contexts, **kwargs)
        finally:
            if owned:
                mirror.end_batch(room_id)

    @functools.wraps(store_mappings_txn)
    def _store_event_state_mappings_txn(
        txn: LoggingTransaction, events_and_contexts: Any
    ) -> None:
        store_mappings_txn(txn, events_and_contexts)
        mirror.write_txn(txn, events_and_contexts)

    persist_store._persist_events_and_state_updates = _persist_events_and_state_updates  # type: ignore[method-assign]
    persist_store._store_event_state_mappings_txn = _store_event_state_mappings_txn  # type: ignore[method-assign]
    return True


def install_lookups(hs: "HomeServer", lookups: StateLookups) -> None:
    """Route Synapse's state-at-event lookups through the mirror."""
    controller = hs.get_storage_controllers().state
    controller.get_state_ids_for_events = lookups.get_state_ids_for_events  # type: ignore[method-assign]
    controller.get_state_for_events = lookups.get_state_for_events  # type: ignore[method-assign]
