"""Row counts of Synapse's state storage and of the module's tables."""

from synapse.server import HomeServer
from synapse.storage.database import DatabasePool, LoggingTransaction

from synapse_nidstate.schema import TABLES

#: Synapse's state storage: the state database's tables, and the main one's map.
SYNAPSE_STATE_TABLES = ("state_groups", "state_groups_state", "state_group_edges")
SYNAPSE_MAIN_TABLES = ("event_to_state_groups",)


async def _count(db_pool: DatabasePool, table: str) -> int:
    def count_txn(txn: LoggingTransaction) -> int:
        txn.execute(f"SELECT COUNT(*) FROM {table}")
        return txn.fetchone()[0]  # type: ignore[index]

    return await db_pool.runInteraction(f"nidstate_count_{table}", count_txn)


async def row_counts(hs: HomeServer) -> dict[str, dict[str, int]]:
    stores = hs.get_datastores()
    synapse_counts = {t: await _count(stores.state.db_pool, t) for t in SYNAPSE_STATE_TABLES}
    synapse_counts.update({t: await _count(stores.main.db_pool, t) for t in SYNAPSE_MAIN_TABLES})
    ours = {t: await _count(stores.main.db_pool, t) for t in TABLES}
    return {"synapse": synapse_counts, "nidstate": ours}
