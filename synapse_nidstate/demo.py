"""`synapse-nidstate demo`: a real Synapse with the module, a history, and the proof.

Starts Synapse in this process (SQLite in a temporary directory by default),
writes a history through Synapse's own handlers with the module in mode
serve, then checks every event's mirrored state against Synapse's native
state-group answer and prints the row counts of both storages.
"""

import argparse
import logging
import os
import time

from synapse_nidstate.cli import Progress, _table
from synapse_nidstate.history import HistoryShape, realistic_history
from synapse_nidstate.inprocess import (
    homeserver_config,
    postgres_database,
    run_in_reactor,
    sqlite_database,
    start_homeserver,
    stop_homeserver,
)
from synapse_nidstate.module import module_for
from synapse_nidstate.report import row_counts
from synapse_nidstate.verify import (
    compare_with_native,
    room_events_with_state,
    standard_filters,
)


def _quiet_logging(data_dir: str) -> str:
    path = os.path.join(data_dir, "homeserver.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def run_demo(args: argparse.Namespace, data_dir: str) -> int:
    log_path = _quiet_logging(data_dir)
    database = (
        postgres_database(args.postgres) if args.postgres else sqlite_database(data_dir)
    )
    config = homeserver_config(data_dir, database, {"mode": "serve"})
    shape = HistoryShape(
        rooms=args.rooms,
        big_room_members=args.big_room_members,
        small_room_members=min(8, args.big_room_members),
        events=args.events,
        seed=args.seed,
    )

    async def demo() -> int:
        engine = "PostgreSQL" if args.postgres else f"SQLite ({data_dir})"
        print(f"synapse-nidstate demo: a real Synapse on {engine}, module in mode serve")
        hs = await start_homeserver(config, data_dir)
        try:
            module = module_for(hs)
            assert module is not None
            started = time.monotonic()
            progress = Progress("sending", shape.events, enabled=not args.no_progress)
            rooms = await realistic_history(hs, shape, progress)
            progress.finish()
            send_seconds = time.monotonic() - started
            event_ids = [e for r in rooms for e in await room_events_with_state(hs, r)]
            print(
                f"wrote {len(event_ids)} events with state in {len(rooms)} rooms "
                f"(biggest room: {shape.big_room_members + 1} users) in {send_seconds:.1f}s"
            )

            members = [f"@user{i}:{hs.hostname}" for i in range(3)]
            filters = standard_filters(members)
            progress = Progress("verifying", len(event_ids), enabled=not args.no_progress)
            result = await compare_with_native(module.lookups, event_ids, filters, progress)
            progress.finish()
            print(
                f"\nverify: {result.events} events x {len(filters)} filters "
                f"({', '.join(filters)}): {result.comparisons} answers compared, "
                f"{len(result.mismatches)} mismatches, {result.unmirrored} not mirrored"
            )
            for mismatch in result.mismatches[:10]:
                print(
                    f"  MISMATCH {mismatch.event_id} ({mismatch.filter_name}): "
                    f"{mismatch.differing_keys[:5]}"
                )

            counts = await row_counts(hs)
            print("\nrows, Synapse's state storage:")
            print(_table(sorted(counts["synapse"].items()), ("table", "rows")))
            print("\nrows, synapse-nidstate:")
            print(_table(sorted(counts["nidstate"].items()), ("table", "rows")))
            stats = module.stats.as_dict()
            print("\nmodule counters:")
            print(
                _table(
                    [(f"{side}.{k}", v) for side, d in stats.items() for k, v in d.items()],
                    ("counter", "value"),
                )
            )
            print(f"\nSynapse's log: {log_path}")
            ok = result.ok and not result.unmirrored
            print("\nRESULT:", "OK, the mirror equals Synapse's state" if ok else "FAILED")
            return 0 if ok else 1
        finally:
            await stop_homeserver(hs)

    return run_in_reactor(demo)
