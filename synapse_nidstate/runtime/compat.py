"""What the module relies on in Synapse's private code, checked at start-up.

The version check (``config.check_synapse_version``) says which releases were
tested; this says whether *this* Synapse has what the module wraps, replaces or
calls, with the parameters the module passes or receives. A release that moved
one of them stops Synapse at start-up with a ``ConfigError`` naming it, even
with ``allow_untested_synapse: true`` (which skips only the version check).

Every entry is looked up on the class Synapse builds its stores from, so the
check runs before any instance is touched. ``hooks.py`` says why each is wrapped.
"""

import inspect
from collections.abc import Callable

import attr
import synapse
from synapse.config._base import ConfigError


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Requirement:
    """``owner.name`` exists and accepts the ``parameters`` the module relies on."""

    owner: str  # dotted path of the class (or module)
    name: str
    parameters: tuple[str, ...]
    why: str


#: Every Synapse method the module wraps, replaces or calls, by who needs it.
REQUIREMENTS: tuple[Requirement, ...] = (
    # hooks.install_mirror (write side)
    Requirement(
        "synapse.storage.databases.main.events.PersistEventsStore",
        "_persist_events_and_state_updates",
        ("room_id", "events_and_contexts"),
        "wrapped: plan a batch's snapshots before Synapse's transaction",
    ),
    Requirement(
        "synapse.storage.databases.main.events.PersistEventsStore",
        "_store_event_state_mappings_txn",
        ("txn", "events_and_contexts"),
        "wrapped: write the snapshots in Synapse's transaction",
    ),
    # hooks.install_full_state_updates
    Requirement(
        "synapse.storage.databases.main.state.StateGroupWorkerStore",
        "update_state_for_partial_state_event",
        ("event", "context"),
        "wrapped: plan the full state of an un-partial-stated event",
    ),
    Requirement(
        "synapse.storage.databases.main.state.StateGroupWorkerStore",
        "_update_state_for_partial_state_event_txn",
        ("txn", "event", "context", "un_partial_state_event_stream_id"),
        "wrapped: give it its snapshot in the same transaction",
    ),
    # hooks.install_lookups
    Requirement(
        "synapse.storage.controllers.state.StateStorageController",
        "get_state_ids_for_events",
        ("event_ids", "state_filter", "await_full_state"),
        "replaced: state-at-event lookups (serve, shadow)",
    ),
    Requirement(
        "synapse.storage.controllers.state.StateStorageController",
        "get_state_for_events",
        ("event_ids", "state_filter"),
        "replaced: state-at-event lookups returning events",
    ),
    # hooks.install_group_reads
    Requirement(
        "synapse.storage.databases.state.bg_updates.StateGroupBackgroundUpdateStore",
        "_get_state_groups_from_groups_txn",
        ("txn", "groups", "state_filter"),
        "wrapped: every read of a state group's state (serve, shadow)",
    ),
    Requirement(
        "synapse.storage.databases.state.store.StateGroupDataStore",
        "get_state_group_delta",
        ("state_group",),
        "wrapped: one edge's delta (serve, shadow); a miss of its cache (.cache, a "
        "DeferredCache keyed by the group) is read by group_reads",
    ),
    # hooks.install_purges
    Requirement(
        "synapse.storage.databases.main.purge_events.PurgeEventsStore",
        "_purge_room_txn",
        ("txn", "room_id"),
        "wrapped: delete a purged room's rows in the purge transaction",
    ),
    Requirement(
        "synapse.storage.databases.state.store.StateGroupDataStore",
        "purge_unreferenced_state_groups",
        ("room_id", "state_groups_to_sequence_numbers"),
        "wrapped: forget deleted state groups",
    ),
    Requirement(
        "synapse.storage.databases.main.cache.CacheInvalidationWorkerStore",
        "_invalidate_caches_for_room_events",
        ("room_id",),
        "wrapped: forget cached event -> snapshot on every process after a purge",
    ),
    # mirror.py (planning) and storage/reads.py (Synapse's own cache rules)
    Requirement(
        "synapse.storage.controllers.state.StateStorageController",
        "get_state_group_delta",
        ("state_group",),
        "called: the delta Synapse stored for a state group",
    ),
    Requirement(
        "synapse.storage.databases.state.store.StateGroupDataStore",
        "_get_state_for_groups",
        ("groups",),
        "called: a state group's full state, when it has no predecessor",
    ),
    Requirement(
        "synapse.storage.databases.state.store.StateGroupDataStore",
        "_get_state_for_group_using_cache",
        ("cache", "group", "state_filter"),
        "called: Synapse's rule for reading a per-group DictionaryCache",
    ),
    Requirement(
        "synapse.storage.databases.state.store.StateGroupDataStore",
        "_insert_into_cache",
        ("group_to_state_dict", "state_filter", "cache_seq_num_members",
         "cache_seq_num_non_members"),
        "called: Synapse's rule for filling the per-group DictionaryCaches",
    ),
    # runtime/failsafe.py: read past the reclaim marker in schema_compat_version
    Requirement(
        "synapse.storage.prepare_database",
        "_upgrade_existing_database",
        ("cur", "current_schema_state"),
        "wrapped: give Synapse its compat version while groups are reclaimed",
    ),
    # storage/schema.py, in-memory SQLite only
    Requirement(
        "synapse.storage.engines.sqlite.Sqlite3Engine",
        "on_new_connection",
        ("db_conn",),
        "wrapped: create the module's tables on each in-memory connection",
    ),
)


def _resolve(dotted: str) -> object:
    module_name, _, attribute = dotted.rpartition(".")
    module = __import__(module_name, fromlist=[attribute])
    return getattr(module, attribute)


def missing(requirements: tuple[Requirement, ...] = REQUIREMENTS) -> list[str]:
    """What this Synapse lacks, one line per requirement not met."""
    problems = []
    for req in requirements:
        where = f"{req.owner.rpartition('.')[2]}.{req.name}"
        try:
            function: Callable = inspect.getattr_static(_resolve(req.owner), req.name)
        except (ImportError, AttributeError):
            problems.append(f"{where} does not exist ({req.why})")
            continue
        # A ``@cached`` method is a descriptor that refuses class access; its
        # function is ``orig``. Static and class methods unwrap to theirs.
        function = getattr(function, "orig", getattr(function, "__func__", function))
        parameters = inspect.signature(function).parameters
        absent = [p for p in req.parameters if p not in parameters]
        if absent:
            problems.append(
                f"{where} has no parameter {', '.join(absent)} ({req.why})"
            )
    return problems


def check_synapse_internals() -> None:
    """Raise ConfigError naming every requirement this Synapse does not meet."""
    problems = missing()
    if problems:
        raise ConfigError(
            f"synapse-nidstate cannot run on Synapse {synapse.__version__}: "
            + "; ".join(problems)
            + ". Upgrade synapse-nidstate, or remove it from homeserver.yaml "
            "(after `synapse-nidstate drop`)."
        )


#: Every place of Synapse that names ``state_groups_state`` (found by a scan of the
#: installed package, ``tests/test_compat.py``), and what the module does about it.
#: A release that adds or moves one fails that test until it is listed here.
STATE_GROUPS_STATE_USERS: dict[str, str] = {
    "storage/databases/state/bg_updates.py:"
    "StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn":
        "read: every read of a group's state; answered from the snapshots (serve) or "
        "compared (shadow) by group_reads, where the state database is the main one",
    "storage/databases/state/store.py:"
    "StateGroupDataStore.get_state_group_delta._get_state_group_delta_txn":
        "read: one edge's delta rows; the wrapped get_state_group_delta answers a miss "
        "of Synapse's cache with the same two reads in one transaction and, for a "
        "reclaimed group, the difference of the snapshots, into the same cache "
        "(group_reads); shadow compares every group's (delta_txn)",
    "storage/databases/state/store.py:"
    "StateGroupDataStore.store_state_group.insert_delta_group_txn":
        "write: a delta group (the mirror plans from the same delta)",
    "storage/databases/state/store.py:"
    "StateGroupDataStore.store_state_group.insert_full_state_txn":
        "write: a full group; the previous group's state, when only a delta is known, "
        "is read through _get_state_groups_from_groups_txn (group_reads)",
    "storage/databases/state/store.py:"
    "StateGroupDataStore.store_state_deltas_for_batched.insert_deltas_group_txn":
        "write: one-row deltas of a batch (mirrored from the events' contexts)",
    "storage/databases/state/store.py:"
    "StateGroupDataStore._purge_unreferenced_state_groups":
        "read + delete: de-deltas surviving children through "
        "_get_state_groups_from_groups_txn (group_reads), deletes the rest; the module "
        "forgets the deleted groups (hooks.install_purges)",
    "storage/databases/state/store.py:StateGroupDataStore._purge_room_state_txn":
        "delete: a purged room's rows; the module deletes its own (hooks.install_purges)",
    "storage/databases/state/bg_updates.py:"
    "StateBackgroundUpdateStore._background_deduplicate_state.reindex_txn":
        "read + rewrite: a background update of old servers; reads through "
        "_get_state_groups_from_groups_txn (group_reads); a group's state is unchanged",
    "storage/databases/state/bg_updates.py:"
    "StateBackgroundUpdateStore._background_index_state.reindex_txn":
        "schema: an index",
    "storage/controllers/stats.py:StatsController.get_room_db_size_estimate":
        "size estimate for the admin API; no state read",
    "storage/databases/main/state.py:StateStore":
        "a docstring naming the table",
    "_scripts/synapse_port_db.py:":
        "synapse_port_db copies the table from SQLite to PostgreSQL; the module's tables "
        "are not copied (migrate again after a port)",
}
