"""Reclaim and restore on a benchmark dataset: how fast, how much memory, and
that Synapse answers every state group as before.

    python -m benchmarks.reclaim [--engine postgres] [--scale M] [--data DIR]
                                 [--batch-size N] [--json FILE]

Takes the dataset ``python -m benchmarks.run`` keeps for that engine and
scale (writing it first if there is none, as that runner does), drops the
module's tables and migrates the whole history, then:

1. Synapse's answer for every state group, by its own code from its rows
   (the module not asked), and the rows of ``state_groups_state``;
2. ``reclaim`` room by room, the room with the most groups first, each room
   timed on its own: groups, rows deleted, seconds, groups per second, and how
   many groups were proved by their delta (the rest from two whole states);
3. ``restore``, timed the same way, and its time against reclaim's;
4. Synapse's answer for every group again, by its own code (the rows are
   back): equal to step 1, and the rows of ``state_groups_state`` no more
   than before.

Peak RSS of the process is printed at the end (it includes the migration).
Exit code 0 when every answer is equal and no group was refused.
"""

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import attr
from synapse.server import HomeServer
from synapse.storage.databases.state.bg_updates import StateGroupBackgroundUpdateStore
from synapse.types.state import StateFilter

from benchmarks.run import REPO, SCALES, analyze, ensure_dataset
from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.demo.inprocess import homeserver_config, start_homeserver, stop_homeserver
from synapse_nidstate.runtime.module import module_for
from synapse_nidstate.storage.schema import drop_tables_txn


async def native_answers(hs: HomeServer) -> tuple[dict[int, Any], int]:
    """Every state group's state by Synapse's own code (unwrapped), and the rows
    of ``state_groups_state``."""
    state = hs.get_datastores().state

    def read_txn(txn: Any) -> tuple[dict[int, Any], int]:
        txn.execute("SELECT id FROM state_groups")
        groups = [row[0] for row in txn.fetchall()]
        answers: dict[int, Any] = {}
        for start in range(0, len(groups), 500):
            part = groups[start : start + 500]
            found = StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn(
                state, txn, part, StateFilter.all()
            )
            answers.update((g, hash(frozenset(found[g].items()))) for g in part)
        txn.execute("SELECT COUNT(*) FROM state_groups_state")
        return answers, txn.fetchone()[0]

    return await state.db_pool.runInteraction("bench_native_answers", read_txn)


async def rows_left(hs: HomeServer) -> int:
    def txn_fn(txn: Any) -> int:
        txn.execute("SELECT COUNT(*) FROM state_groups_state")
        return int(txn.fetchone()[0])

    return await hs.get_datastores().main.db_pool.runInteraction("bench_rows", txn_fn)


async def rooms_by_groups(hs: HomeServer) -> list[tuple[str, int]]:
    def txn_fn(txn: Any) -> list[tuple[str, int]]:
        txn.execute(
            "SELECT room_id, COUNT(*) FROM state_groups GROUP BY room_id ORDER BY 2 DESC, 1"
        )
        return [(room, int(n)) for room, n in txn.fetchall()]

    return await hs.get_datastores().main.db_pool.runInteraction("bench_rooms", txn_fn)


async def members(hs: HomeServer, room_id: str) -> int:
    return len(await hs.get_datastores().main.get_users_in_room(room_id))  # type: ignore[call-arg,arg-type]  # @cached without Synapse's mypy plugin


async def run(args: argparse.Namespace) -> dict[str, Any]:
    scale = SCALES[args.scale]
    meta = {"scale": args.scale, "engine": args.engine, "shape": attr.asdict(scale.shape)}
    dataset = await ensure_dataset(args, scale, meta)
    with_module = homeserver_config(
        dataset.data_dir, dataset.database,
        {"mode": "serve", "reclaim": {"batch_size": args.batch_size}},
    )
    hs = await start_homeserver(
        homeserver_config(dataset.data_dir, dataset.database, None), dataset.data_dir
    )
    try:
        await hs.get_datastores().main.db_pool.runInteraction("bench_drop", drop_tables_txn)
    finally:
        await stop_homeserver(hs)

    hs = await start_homeserver(with_module, dataset.data_dir)
    result: dict[str, Any] = {"scale": args.scale, "engine": args.engine, "rooms": []}
    try:
        module = module_for(hs)
        assert module is not None
        started = time.perf_counter()
        await module.migrator.run()
        result["migration_seconds"] = time.perf_counter() - started
        await analyze(args, hs)
        before, rows_before = await native_answers(hs)
        result["groups"], result["rows_before"] = len(before), rows_before
        reclaimer = module.reclaimer
        for room_id, groups in await rooms_by_groups(hs):
            started = time.perf_counter()
            totals = await reclaimer.run(room_id)
            seconds = time.perf_counter() - started
            result["rooms"].append({
                "room_id": room_id, "members": await members(hs, room_id), "groups": groups,
                "reclaimed": totals.groups, "refused": totals.refused,
                # (getattr: the code before proofs by delta counts none)
                "by_delta": getattr(totals, "by_delta", 0),
                "in_nids": getattr(totals, "in_nids", 0), "rows": totals.rows,
                "seconds": seconds,
            })
            print(f"reclaim {room_id}: {room_line(result['rooms'][-1])}", flush=True)
        result["rows_reclaimed"] = await rows_left(hs)
        started = time.perf_counter()
        restored = await reclaimer.restore()
        result["restore"] = {
            "groups": restored.groups, "rows": restored.rows,
            "by_delta": getattr(restored, "by_delta", 0),
            "seconds": time.perf_counter() - started,
        }
        after, rows_after = await native_answers(hs)
        result["rows_after"] = rows_after
        result["answers_equal"] = after == before
        result["differing_groups"] = sum(1 for g in before if after.get(g) != before[g])
    finally:
        await stop_homeserver(hs)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def room_line(room: dict[str, Any]) -> str:
    rate = room["reclaimed"] / room["seconds"] if room["seconds"] else 0.0
    return (
        f"{room['members']:,} members, {room['reclaimed']:,} of {room['groups']:,} groups "
        f"({room['by_delta']:,} by delta, {room.get('in_nids', 0):,} whole in NIDs, "
        f"{room['refused']} refused), {room['rows']:,} rows, "
        f"{room['seconds']:.2f} s, {rate:,.0f} groups/s"
    )


def report(result: dict[str, Any], command: str) -> str:
    rooms = result["rooms"]
    reclaim_seconds = sum(r["seconds"] for r in rooms)
    reclaimed = sum(r["reclaimed"] for r in rooms)
    restore = result["restore"]
    lines = [
        f"$ {command}",
        f"{result['engine']} {result['scale']}: {result['groups']:,} state groups, "
        f"{result['rows_before']:,} rows of state_groups_state; migration "
        f"{result['migration_seconds']:.1f} s",
        "biggest rooms:",
        *(f"  {room_line(r)}" for r in rooms[:3]),
        f"reclaim, every room: {reclaimed:,} groups in {reclaim_seconds:.1f} s "
        f"({reclaimed / reclaim_seconds if reclaim_seconds else 0:,.0f} groups/s), "
        f"{sum(r['by_delta'] for r in rooms):,} by delta, "
        f"{sum(r['refused'] for r in rooms)} refused",
        f"rows of state_groups_state left after reclaim: {result['rows_reclaimed']:,}",
        f"restore: {restore['groups']:,} groups, {restore['rows']:,} rows in "
        f"{restore['seconds']:.1f} s ({restore['by_delta']:,} by delta); "
        f"restore / reclaim time: {restore['seconds'] / reclaim_seconds if reclaim_seconds else 0:.2f}",
        f"Synapse's own answer for every group after restore equal to before: "
        f"{result['answers_equal']} ({result['differing_groups']} differ); rows "
        f"{result['rows_after']:,} (before {result['rows_before']:,})",
        f"peak RSS: {result['peak_rss_mib']:,.0f} MiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reclaim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="postgres")
    parser.add_argument("--scale", choices=sorted(SCALES), default="M")
    parser.add_argument("--postgres", metavar="DSN", default="host=127.0.0.1 port=5432 user=postgres")
    parser.add_argument("--database-name", metavar="NAME")
    parser.add_argument("--data", metavar="DIR")
    parser.add_argument("--batch-size", type=int, default=100, help="groups per transaction")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    args.rebuild, args.port_from, args.progress = False, None, False
    args.data = os.path.abspath(
        args.data or os.path.join(REPO, "benchmarks", "data", f"{args.engine}-{args.scale}")
    )
    command = "python -m benchmarks.reclaim " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_in_reactor(lambda: run(args), "nidstate-benchmark-reclaim")
    print(report(result, command))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, **result}, f, indent=2)
    refused = sum(r["refused"] for r in result["rooms"])
    return 0 if result["answers_equal"] and not refused else 1


if __name__ == "__main__":
    sys.exit(main())
