"""`python -m benchmarks.profile`: where a state-at-event lookup, or the migration, spends its time.

Runs one lookup kind (cold by default) on the benchmark's kept dataset, under
cProfile, on the native path or the mirror, and prints the top functions by
cumulative and by own time. The dataset must exist (run ``benchmarks.run``
with the same ``--engine``/``--scale`` first); the module's tables must be
migrated (``benchmarks.run`` leaves them so).

    python -m benchmarks.profile --scale M --lookup full --path nid
    python -m benchmarks.profile --engine postgres --scale M --migration

``--migration`` drops the module's tables and profiles the whole migration
instead (as the runner's step 1 does it; the tables are migrated again at the end).

``--compare`` runs no profiler: it times the lookup on both paths, alternating,
three times over the events, and prints each path's p50, where a lookup's
time goes (its statements, the rest of its transactions: the Python between
them, and the rest) and the p50 of each statement it ran; a quick check of a
change (the runner is the measure):

    python -m benchmarks.profile --engine postgres --scale M --lookup group-member --compare

``--homeserver-config`` profiles lookups on the database a homeserver.yaml opens
instead (the module configured and migrated there), on ``--room``'s latest events,
with their senders as the members asked for (``--member`` names the one a
one-member filter asks); for the HQ-scale run's data:

    python -m benchmarks.profile --homeserver-config /work/runs/hq/homeserver.yaml \
        --room '!room0:hq.example' --lookup full --events 5
"""

import argparse
import contextlib
import cProfile
import functools
import io
import os
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from synapse.types.state import StateFilter

from benchmarks.run import REPO, SCALES, count_database_work, prepare_postgres
from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.commands.verify import (
    latest_room_events_with_state,
    room_events_with_state,
)
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
from synapse_nidstate.storage.schema import analyze_tables_txn, drop_tables_txn


def _report(
    profilers: list[cProfile.Profile], top: int, title: str, statements: dict[str, list[float]]
) -> str:
    out = io.StringIO()
    out.write(title + "\n")
    stats = pstats.Stats(*profilers, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    by_sql: dict[str, list[float]] = {}
    for sql, times in statements.items():
        by_sql.setdefault(" ".join(sql.split())[:110], []).extend(times)
    total = sum(sum(times) for times in by_sql.values())
    out.write(f"statements: {sum(map(len, by_sql.values())):,}, {total:.3f}s in all "
              "(wall time on the database threads, the driver's included), by statement:\n")
    for sql, times in sorted(by_sql.items(), key=lambda kv: -sum(kv[1]))[:top]:
        out.write(f"  {sum(times):7.3f}s {len(times):6,} x  {sql}\n")
    return out.getvalue()


async def _compare(
    hs: Any,
    lookups: Any,
    paths: dict[str, Callable[[list[Any], StateFilter], Awaitable[object]]],
    groups: list[list[Any]],
    state_filter: StateFilter,
    args: argparse.Namespace,
) -> str:
    """Each lookup on both paths, alternating, cold unless ``--warm``, without
    a profiler: the p50 of each and their ratio, for trying a change quickly
    (``benchmarks.run`` is the measure that counts)."""
    times: dict[str, list[float]] = {path: [] for path in paths}
    statements: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    # Per lookup: its statements' time, and the rest of its transactions' time.
    in_statements: dict[str, list[float]] = {path: [] for path in paths}
    in_python: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(3):
        for group in groups:
            for path, call in paths.items():
                if args.warm:
                    await call(group, state_filter)
                else:
                    clear_state_caches(hs, lookups)
                with count_database_work() as work:
                    started = time.perf_counter()
                    await call(group, state_filter)
                    times[path].append(time.perf_counter() - started)
                for sql, took in work.by_statement.items():
                    statements[path].setdefault(" ".join(sql.split())[:70], []).extend(took)
                spent = sum(sum(took) for took in work.by_statement.values())
                in_statements[path].append(spent)
                in_python[path].append(sum(work.transaction_seconds) - spent)
    p50 = {path: statistics.median(t) * 1000 for path, t in times.items()}
    lines = [
        f"{args.lookup} ({'warm' if args.warm else 'cold'}), {len(times['nid'])} lookups a path:"
        f" native p50 {p50['native']:.3f} ms, NID p50 {p50['nid']:.3f} ms,"
        f" {p50['native'] / p50['nid']:.2f}x"
    ]
    lines.append(
        "  where a lookup's time goes (p50s, ms): the statements (Synapse's execute, the"
        " driver's and the server's time), the rest of its transactions (Python, commit),"
        " the rest of the lookup (the reactor, caches, the thread's hand-over)"
    )
    for path in paths:
        lines.append(
            f"  {path:6} statements {statistics.median(in_statements[path]) * 1000:.3f},"
            f" rest of the transactions {statistics.median(in_python[path]) * 1000:.3f},"
            f" rest {statistics.median(t - s - p for t, s, p in zip(times[path], in_statements[path], in_python[path], strict=True)) * 1000:.3f}"
        )
    for path, by_sql in statements.items():
        for sql, took in by_sql.items():
            lines.append(
                f"  {path:6} {len(took):5} x p50 {statistics.median(took) * 1000:.3f} ms  {sql}"
            )
    return "\n".join(lines)


#: From Python 3.12 cProfile rests on ``sys.monitoring``, which sees every
#: thread (and refuses a second profiler enabled beside the first).
PROFILER_SEES_EVERY_THREAD = sys.version_info >= (3, 12)

#: The state-group lookups: ``_get_state_for_groups`` with the filter of the
#: state-at-event lookup kind of the same name.
GROUP_LOOKUPS = ("group-full", "group-member", "group-lazy")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--scale", choices=sorted(SCALES), default="M")
    parser.add_argument("--postgres", default="host=127.0.0.1 port=5432 user=postgres")
    parser.add_argument("--database-name")
    parser.add_argument(
        "--lookup", choices=("full", "member", "lazy", "batch", *GROUP_LOOKUPS), default="full",
        help="state at events, or (group-*) the state of the events' state groups "
        "through _get_state_for_groups, as the runner times them",
    )
    parser.add_argument("--path", choices=("native", "nid"), default="nid")
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--migration", action="store_true",
        help="profile a whole migration (the module's tables dropped first) instead of lookups",
    )
    parser.add_argument(
        "--homeserver-config", metavar="HOMESERVER_YAML",
        help="profile lookups on the database this homeserver.yaml opens (with the module), "
        "not on the benchmark's dataset",
    )
    parser.add_argument("--room", help="with --homeserver-config: the room to look up state in")
    parser.add_argument(
        "--member",
        help="the member whose key the one-member and visibility filters ask"
        " (default: the first sender of the events, or the dataset's first user)",
    )
    parser.add_argument(
        "--compare", action="store_true",
        help="no profiler: time the lookup on both paths, alternating, and print each p50",
    )
    args = parser.parse_args()
    if args.homeserver_config and (args.migration or not args.room):
        parser.error("--homeserver-config profiles lookups, in the --room it names")

    import json

    if args.homeserver_config:
        with open(args.homeserver_config) as f:
            homeserver_yaml = yaml.safe_load(f)
        data_dir = os.path.dirname(os.path.abspath(args.homeserver_config))
        room_id = args.room
    else:
        data_dir = os.path.join(REPO, "benchmarks", "data", f"{args.engine}-{args.scale}")
        with open(os.path.join(data_dir, "dataset.json")) as f:
            writer = HistoryWriter.restore(json.load(f)["writer"])
        room_id = writer.rooms[0]
        if args.engine == "postgres":
            name = args.database_name or f"nidstate_bench_{args.scale.lower()}"
            database = postgres_database(prepare_postgres(args.postgres, name, fresh=False)[0])
        else:
            database = sqlite_database(data_dir)

    def config(with_module: bool) -> dict:
        if args.homeserver_config:
            return homeserver_yaml
        return homeserver_config(data_dir, database, {"mode": "serve"} if with_module else None)

    async def profile() -> str:
        if args.migration:
            hs = await start_homeserver(config(False), data_dir)
            try:
                await hs.get_datastores().main.db_pool.runInteraction(
                    "profile_drop", drop_tables_txn
                )
            finally:
                await stop_homeserver(hs)
        hs = await start_homeserver(config(True), data_dir)
        try:
            module = module_for(hs)
            assert module is not None
            profiler = cProfile.Profile()
            # Synapse runs transactions on its database threads, where a profiler
            # started here does not look. Each transaction is profiled by a
            # profiler of its own, merged into the report: one profiler enabled
            # on two threads at once shares one stack of calls between them, and
            # what it records then depends on how the threads interleave.
            profilers = [profiler]
            db_pool = hs.get_datastores().main.db_pool
            new_transaction = db_pool.new_transaction

            def profiled_transaction(*a: object, **kw: object) -> object:
                if PROFILER_SEES_EVERY_THREAD or threading.current_thread() is threading.main_thread():
                    return new_transaction(*a, **kw)  # type: ignore[arg-type]
                on_this_thread = cProfile.Profile()
                on_this_thread.enable()
                try:
                    return new_transaction(*a, **kw)  # type: ignore[arg-type]
                finally:
                    on_this_thread.disable()
                    profilers.append(on_this_thread)

            if args.migration:
                db_pool.new_transaction = profiled_transaction  # type: ignore[method-assign,assignment]
                started = time.perf_counter()
                profiler.enable()
                try:
                    with count_database_work() as work:
                        await module.migrator.run()
                finally:
                    profiler.disable()
                    db_pool.new_transaction = new_transaction  # type: ignore[method-assign]
                seconds = time.perf_counter() - started
                # Planner statistics for the tables just filled, as `migrate`
                # leaves them (PostgreSQL): lookups profiled after this one
                # would otherwise be planned as over empty tables.
                await db_pool.runInteraction("profile_analyze", analyze_tables_txn)
                migration = module.stats.migration
                return _report(
                    profilers,
                    args.top,
                    f"migration: {migration.events_migrated:,} events in {migration.batches} "
                    f"batches, {seconds:.1f}s under the profiler",
                    work.by_statement,
                )
            lookups = module.lookups
            if args.homeserver_config:
                events = await latest_room_events_with_state(hs, room_id, args.events)
                senders = sorted(
                    {e.sender for e in (await hs.get_datastores().main.get_events(events)).values()}
                )
                member, others = senders[0], senders[1:]
            else:
                events = (await room_events_with_state(hs, room_id))[-args.events :]
                member, others = writer.users[1], writer.users[2:]
            if args.member:
                member = args.member
            filters = lookup_filters(member, others)
            kind = args.lookup.removeprefix("group-")
            state_filter = {
                "full": StateFilter.all(),
                "member": filters["one member key"],
                "lazy": filters["lazy-load members"],
                "batch": visibility_filter(member),
            }[kind]
            paths: dict[str, Callable[[list[Any], StateFilter], Awaitable[object]]] = {
                "native": functools.partial(lookups.native_state_ids, fresh=False, alone=True),
                "nid": lookups.mirrored_state_ids,
            }
            groups: list[list[Any]] = [events] if args.lookup == "batch" else [[e] for e in events]
            if args.lookup in GROUP_LOOKUPS:
                # Synapse's read of a group, through the module's replacement
                # (native: within native_only, where it is Synapse's own).
                by_event = await hs.get_datastores().main._get_state_group_for_events(events)  # type: ignore[call-arg, arg-type, misc]
                groups = [[by_event[e]] for e in events]
                state = hs.get_datastores().state
                group_reads = lookups.group_reads
                assert group_reads is not None, "the module does not serve state-group reads here"

                def read_groups(path: str) -> Callable[[list[Any], StateFilter], Awaitable[object]]:
                    async def read(wanted: list[Any], state_filter: StateFilter) -> object:
                        guard = group_reads.native_only(fresh=False, alone=True)
                        with guard if path == "native" else contextlib.nullcontext():
                            return await state._get_state_for_groups(wanted, state_filter)

                    return read

                paths = {path: read_groups(path) for path in paths}
            await lookups.check_timeable()
            if args.compare:
                return await _compare(hs, lookups, paths, groups, state_filter, args)
            call = paths[args.path]
            by_statement: dict[str, list[float]] = {}
            for group in groups:
                if args.warm:
                    await call(group, state_filter)
                else:
                    clear_state_caches(hs, lookups)
                db_pool.new_transaction = profiled_transaction  # type: ignore[method-assign,assignment]
                profiler.enable()
                try:
                    with count_database_work() as work:
                        await call(group, state_filter)
                finally:
                    profiler.disable()
                    db_pool.new_transaction = new_transaction  # type: ignore[method-assign]
                for sql, times in work.by_statement.items():
                    by_statement.setdefault(sql, []).extend(times)
            return _report(profilers, args.top, f"{args.lookup} lookups, {args.path}", by_statement)
        finally:
            await stop_homeserver(hs)

    print(run_in_reactor(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
