"""Every place of Synapse that names ``state_groups_state``, and what the
module does about it: the readers and writers of the table reclaim deletes
rows of. ``tests/test_compat.py`` scans the installed Synapse for the table's
name and fails on a place not listed here; the README's table names each.
"""

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
