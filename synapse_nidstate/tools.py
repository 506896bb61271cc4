"""The command line's work: migrate, verify and drop, on an operator's homeserver.yaml."""

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine
from synapse.types import RoomID

from synapse_nidstate.config import NidStateConfig
from synapse_nidstate.inprocess import module_config_of
from synapse_nidstate.lookups import StateLookups
from synapse_nidstate.metrics import LookupStats, MirrorStats
from synapse_nidstate.migrate import Migrator
from synapse_nidstate.schema import TABLES, current_version_txn
from synapse_nidstate.storage import NidStore
from synapse_nidstate.verify import (
    compare_with_native,
    events_with_state,
    find_orphans,
    sample_events_with_state,
    standard_filters,
)

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


def _store(hs: "HomeServer") -> NidStore:
    config = module_config_of(hs) or NidStateConfig()
    return NidStore(hs, config)


async def migrate(hs: "HomeServer", args: argparse.Namespace) -> int:
    from synapse_nidstate.cli import Progress

    stats = MirrorStats()
    migrator = Migrator(hs, _store(hs), stats, batch_size=args.batch_size)
    total = await migrator.remaining()
    progress = Progress("migrating", total, enabled=not args.no_progress)
    result = await migrator.run(progress)
    progress.finish()
    seconds = max(progress.elapsed(), 1e-9)
    done = migrator.stats.events_migrated
    print(
        f"migrated {done} events in {migrator.stats.batches} batches, "
        f"{seconds:.1f}s ({done / seconds:,.0f} events/s); "
        f"{stats.snapshots_built} snapshots built, {stats.full_state_reads} full states read; "
        f"stream orderings done: [{result.low}, {result.high}]"
    )
    return 0


async def verify(hs: "HomeServer", args: argparse.Namespace) -> int:
    from synapse_nidstate.cli import Progress

    controller = hs.get_storage_controllers().state
    lookups = StateLookups(
        controller, _store(hs), LookupStats(), "mirror", controller.get_state_ids_for_events
    )
    filters = standard_filters([f"@nobody:{hs.hostname}"])
    if args.sample is not None:
        event_ids = await sample_events_with_state(hs, args.sample, args.room)
        total = len(event_ids)
        source = event_ids
    else:
        total = await _count_events_with_state(hs, args.room)
        source = events_with_state(hs, args.room)  # type: ignore[assignment]
    progress = Progress("verifying", total, enabled=not args.no_progress)
    result = await compare_with_native(lookups, source, filters, progress)
    progress.finish()
    orphans = await find_orphans(hs)
    report = {
        "events": result.events,
        "comparisons": result.comparisons,
        "mismatches": [
            {"event_id": m.event_id, "filter": m.filter_name, "differing_keys": m.differing_keys}
            for m in result.mismatches
        ],
        "not_mirrored": result.unmirrored,
        "not_mirrored_sample": result.unmirrored_sample,
        "orphan_events": orphans.events,
        "orphan_event_sample": orphans.event_sample,
        "orphan_state_groups": orphans.groups,
        "orphan_state_group_sample": orphans.group_sample,
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(
            f"verified {result.events} events x {len(filters)} filters "
            f"({', '.join(filters)}): {result.comparisons} answers compared"
        )
        for m in result.mismatches[:50]:
            print(f"MISMATCH {m.event_id} ({m.filter_name}): differing keys {m.differing_keys}")
        print(f"mismatches: {len(result.mismatches)}")
        print(
            f"not mirrored (answered by Synapse): {result.unmirrored}"
            + (" (run migrate)" if result.unmirrored else "")
        )
        for event_id in orphans.event_sample:
            print(f"ORPHAN event {event_id}: mirrored, but Synapse has no state for it")
        for group in orphans.group_sample:
            print(f"ORPHAN state group {group}: mirrored, but Synapse no longer has it")
        print(f"orphans: {orphans.events} events, {orphans.groups} state groups")
    return 1 if result.mismatches or orphans.count else 0


async def _count_events_with_state(hs: "HomeServer", room_id: str | None) -> int:
    def count_txn(txn: LoggingTransaction) -> int:
        if room_id is None:
            txn.execute("SELECT COUNT(*) FROM event_to_state_groups")
        else:
            txn.execute(
                "SELECT COUNT(*) FROM event_to_state_groups AS esg"
                " JOIN events AS e ON e.event_id = esg.event_id WHERE e.room_id = ?",
                (room_id,),
            )
        return txn.fetchone()[0]  # type: ignore[index]

    return await hs.get_datastores().main.db_pool.runInteraction(
        "nidstate_count_events_with_state", count_txn
    )


def drop_tables_txn(txn: LoggingTransaction) -> None:
    """Remove every table (and sequence) of the module; Synapse's own are not touched."""
    for table in TABLES:
        txn.execute(f"DROP TABLE IF EXISTS {table}")
    if isinstance(txn.database_engine, PostgresEngine):
        txn.execute("DROP SEQUENCE IF EXISTS nidstate_event_types_seq")
        txn.execute("DROP SEQUENCE IF EXISTS nidstate_state_keys_seq")


async def drop(hs: "HomeServer", args: argparse.Namespace) -> int:
    db_pool = hs.get_datastores().main.db_pool
    if await db_pool.runInteraction("nidstate_schema_version", current_version_txn) == 0:
        print("no synapse-nidstate tables in this database")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("refusing to drop without --yes (standard input is not a terminal)")
            return 2
        answer = input(
            f"Drop every synapse-nidstate table ({', '.join(TABLES)}) from "
            f"{hs.hostname}'s database? Synapse's own tables are not touched. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing dropped")
            return 1

    await db_pool.runInteraction("nidstate_drop", drop_tables_txn)
    print(
        f"dropped {len(TABLES)} tables. Remove the module from homeserver.yaml, or it "
        "creates them again at the next start (then run migrate to catch up)."
    )
    return 0


def check_room_id(value: str) -> str:
    """argparse type: a well-formed Matrix room ID."""
    if not RoomID.is_valid(value):
        raise argparse.ArgumentTypeError(f"not a Matrix room ID (like !abc:example.org): {value!r}")
    return value
