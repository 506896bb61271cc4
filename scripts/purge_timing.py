"""How long Synapse's purges take, and how much of it is the module's part.

    python scripts/purge_timing.py --homeserver-config FILE --room ROOM \\
        [--history-fraction 0.5] [--purge-room]

DESTRUCTIVE: it purges, through Synapse's own code, on the database the
homeserver.yaml opens (meant for the data ``scripts/hq_scale.py`` writes). With
the module loaded (mode serve) from that file:

1. ``--history-fraction F``: Synapse's ``purge_history`` of the oldest F of the
   room's events, then Synapse's deletion of the state groups that left
   unreferenced (its background job, run at once); the module forgets those
   groups and deletes the snapshots and blocks only they used
   (``forget_state_groups_txn``, in a transaction of its own).
2. ``--purge-room``: Synapse's ``purge_room`` of the room; the module deletes
   the room's rows in Synapse's purge transaction (``purge_room_txn``).

Each step prints Synapse's wall time for the whole purge and the time of the
module's own statements within it (its ``*_txn`` functions, timed around),
with the module's rows before and after.
"""

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from migration_at_scale import load_homeserver  # noqa: E402

from synapse_nidstate.commands.homeserver import run_in_reactor  # noqa: E402
from synapse_nidstate.demo.inprocess import start_homeserver, stop_homeserver  # noqa: E402
from synapse_nidstate.runtime.module import module_for  # noqa: E402

MODULE_TABLES = ("nidstate_state_groups", "nidstate_snapshots", "nidstate_blocks", "nidstate_events")


def timed(owner: Any, name: str, seconds: list[float]) -> None:
    """Add the wall time of every call of ``owner.name`` to ``seconds``."""
    original = getattr(owner, name)

    def timing(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(owner, name, timing)


async def rows(hs: Any) -> dict[str, int]:
    def count_txn(txn: Any) -> dict[str, int]:
        found = {}
        for table in MODULE_TABLES:
            txn.execute(f"SELECT COUNT(*) FROM {table}")
            found[table] = txn.fetchone()[0]
        return found

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_purge_rows", count_txn)


def report(step: str, synapse_seconds: float, ours: list[float], before: dict, after: dict) -> None:
    print(
        f"{step}: Synapse's purge {synapse_seconds:.2f} s in all; the module's part "
        f"{sum(ours):.3f} s in {len(ours)} calls ({sum(ours) / synapse_seconds:.1%} of it)"
    )
    for table in MODULE_TABLES:
        print(f"  {table}: {before[table]:,} -> {after[table]:,} rows")


async def run(args: argparse.Namespace, config: dict, data_dir: str) -> int:
    hs = await start_homeserver(config, data_dir)
    try:
        module = module_for(hs)
        if module is None:
            print("the homeserver.yaml does not load synapse_nidstate", file=sys.stderr)
            return 2
        store = module.store
        main = hs.get_datastores().main
        purge = hs.get_storage_controllers().purge_events
        if args.history_fraction:
            ours: list[float] = []
            timed(store, "forget_state_groups_txn", ours)
            event_ids = await main.db_pool.simple_select_onecol(
                "events", {"room_id": args.room}, "event_id", desc="nidstate_purge_events"
            )
            orderings = await main.db_pool.simple_select_list(
                "events", {"room_id": args.room}, ("event_id", "stream_ordering"),
                desc="nidstate_purge_orderings",
            )
            orderings.sort(key=lambda row: row[1])
            cut = orderings[int(len(orderings) * args.history_fraction)][0]
            token = await (await main.get_topological_token_for_event(cut)).to_string(main)
            before = await rows(hs)
            started = time.perf_counter()
            await purge.purge_history(args.room, token, True)
            hs.get_datastores().state_deletion.DELAY_BEFORE_DELETION_MS = 0
            await purge._delete_state_groups_loop()
            report(
                f"purge_history of {args.history_fraction:.0%} of {len(event_ids):,} events "
                "and the state groups it left unreferenced",
                time.perf_counter() - started, ours, before, await rows(hs),
            )
        if args.purge_room:
            ours = []
            timed(store, "purge_room_txn", ours)
            before = await rows(hs)
            started = time.perf_counter()
            await purge.purge_room(args.room)
            report(
                f"purge_room {args.room}", time.perf_counter() - started, ours, before,
                await rows(hs),
            )
        return 0
    finally:
        await stop_homeserver(hs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--homeserver-config", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--history-fraction", type=float, default=0.0)
    parser.add_argument("--purge-room", action="store_true")
    args = parser.parse_args()
    config, data_dir = load_homeserver(args.homeserver_config, "purge_timing.log")
    return run_in_reactor(lambda: run(args, config, data_dir))


if __name__ == "__main__":
    sys.exit(main())
