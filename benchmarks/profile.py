"""`python -m benchmarks.profile`: where a state-at-event lookup spends its time.

Runs one lookup kind (cold by default) on the benchmark's kept dataset, under
cProfile, on the native path or the mirror, and prints the top functions by
cumulative and by own time. The dataset must exist (run ``benchmarks.run``
with the same ``--engine``/``--scale`` first); the module's tables must be
migrated (``benchmarks.run`` leaves them so).

    python -m benchmarks.profile --scale M --lookup full --path nid
"""

import argparse
import cProfile
import io
import os
import pstats
import sys

from synapse.types.state import StateFilter

from benchmarks.run import REPO, SCALES, prepare_postgres
from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.commands.verify import room_events_with_state
from synapse_nidstate.demo.history import HistoryWriter
from synapse_nidstate.demo.inprocess import (
    homeserver_config,
    postgres_database,
    sqlite_database,
    start_homeserver,
    stop_homeserver,
)
from synapse_nidstate.demo.timing import clear_state_caches, lookup_filters, visibility_filter
from synapse_nidstate.runtime.module import module_for


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--scale", choices=sorted(SCALES), default="M")
    parser.add_argument("--postgres", default="host=127.0.0.1 port=5432 user=postgres")
    parser.add_argument("--database-name")
    parser.add_argument("--lookup", choices=("full", "member", "lazy", "batch"), default="full")
    parser.add_argument("--path", choices=("native", "nid"), default="nid")
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import json

    data_dir = os.path.join(REPO, "benchmarks", "data", f"{args.engine}-{args.scale}")
    with open(os.path.join(data_dir, "dataset.json")) as f:
        writer = HistoryWriter.restore(json.load(f)["writer"])
    if args.engine == "postgres":
        name = args.database_name or f"nidstate_bench_{args.scale.lower()}"
        database = postgres_database(prepare_postgres(args.postgres, name, fresh=False)[0])
    else:
        database = sqlite_database(data_dir)

    async def profile() -> str:
        hs = await start_homeserver(
            homeserver_config(data_dir, database, {"mode": "serve"}), data_dir
        )
        try:
            module = module_for(hs)
            assert module is not None
            lookups = module.lookups
            events = (await room_events_with_state(hs, writer.rooms[0]))[-args.events :]
            filters = lookup_filters(writer.users[1], writer.users[2:])
            state_filter = {
                "full": StateFilter.all(),
                "member": filters["one member key"],
                "lazy": filters["lazy-load members"],
                "batch": visibility_filter(writer.users[1]),
            }[args.lookup]
            call = lookups.native_state_ids if args.path == "native" else lookups.mirrored_state_ids
            groups = [events] if args.lookup == "batch" else [[e] for e in events]
            profiler = cProfile.Profile()
            # Synapse runs transactions on its database threads, where a profiler
            # started here does not look: profile inside the transaction as well.
            db_pool = hs.get_datastores().main.db_pool
            new_transaction = db_pool.new_transaction

            def profiled_transaction(*a: object, **kw: object) -> object:
                profiler.enable()
                try:
                    return new_transaction(*a, **kw)  # type: ignore[arg-type]
                finally:
                    profiler.disable()

            for group in groups:
                if args.warm:
                    await call(group, state_filter)
                else:
                    clear_state_caches(hs, lookups)
                db_pool.new_transaction = profiled_transaction  # type: ignore[method-assign,assignment]
                profiler.enable()
                try:
                    await call(group, state_filter)
                finally:
                    profiler.disable()
                    db_pool.new_transaction = new_transaction  # type: ignore[method-assign]
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top)
            return out.getvalue()
        finally:
            await stop_homeserver(hs)

    print(run_in_reactor(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
