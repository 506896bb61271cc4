"""`synapse-nidstate migrate`: mirror the history persisted before the module ran."""

import argparse
import time
from typing import TYPE_CHECKING

from synapse_nidstate.commands.homeserver import nid_store
from synapse_nidstate.commands.ui import WorkProgress, counted
from synapse_nidstate.runtime.metrics import MirrorStats
from synapse_nidstate.runtime.migration import Migrator
from synapse_nidstate.storage.schema import analyze_tables_txn

if TYPE_CHECKING:
    from synapse.server import HomeServer


async def migrate(hs: "HomeServer", args: argparse.Namespace) -> int:
    stats = MirrorStats()
    store = nid_store(hs)  # one per process: its caches are named in Synapse's metrics
    migrator = Migrator(hs, store, stats, batch_size=args.batch_size)
    total = await migrator.remaining()
    progress = WorkProgress("migrating", total, enabled=not args.no_progress)
    result = await migrator.run(progress)
    progress.finish()
    seconds = max(progress.elapsed(), 1e-9)
    done = migrator.stats.events_migrated
    print(
        f"migrated {counted(done, 'event')} in {counted(migrator.stats.batches, 'batch', 'batches')}, "
        f"{seconds:.1f}s ({done / seconds:,.0f} events/s); "
        f"{counted(stats.snapshots_built, 'snapshot')} built, "
        f"{counted(stats.full_state_reads, 'full state')} read "
        f"({stats.full_states_rebased:,} stored on a similar snapshot, "
        f"{stats.full_states_by_difference:,} of them read as their difference from it); "
        f"stream orderings done: [{result.low}, {result.high}]"
    )
    # Then the strings beside the blocks (what a whole read takes instead of
    # a probe per NID), timed apart: the history is served without them.
    started = time.monotonic()
    filled = await migrator.fill_block_strings()
    print(
        f"gave {counted(filled, 'block')} the strings of their entries "
        f"in {time.monotonic() - started:.1f}s"
    )
    # PostgreSQL: planner statistics for the tables just filled, so that the
    # reads that follow are planned on their size (autovacuum may be off).
    started = time.monotonic()
    if await store.db_pool.runInteraction(
        "nidstate_migrate_analyze", analyze_tables_txn
    ):
        print(f"analyzed the module's tables in {time.monotonic() - started:.1f}s")
    return 0
