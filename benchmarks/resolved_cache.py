"""`python -m benchmarks.resolved_cache`: what the resolved-state cache keeps
for a room's latest state groups.

The cache keeps a whole state once per base and the other snapshots as their
changes against one (``storage/resolved.py``). This command empties every
cache, reads the full state of a room's latest ``--groups`` state groups
through Synapse's own entry point (``_get_state_for_groups``, which the module
answers in mode ``serve``) in the order ``--order`` names, and reports what
the cache then holds: bases and changes, their state entries and their bytes
(pympler, with Synapse's own sizing function, as the runner weighs caches).

* ``oldest``: one group a read, oldest first, as a live server reads its
  new events' groups;
* ``newest``: one group a read, newest first (each read before the groups it
  builds on);
* ``batch``: all the groups in one call (Synapse reads them 100 a
  transaction).

On the database a homeserver.yaml opens (the module configured there, migrated)::

    python -m benchmarks.resolved_cache --homeserver-config benchmarks/data/postgres-L/homeserver-nid.yaml \\
        --room '!EanG37xH6AJo6_bX8YEZGTDeKFaegzmUjNrLOA8QP2o' --order oldest
"""

import argparse
import json
import sys
from typing import Any

from synapse.server import HomeServer
from synapse.types.state import StateFilter

ORDERS = ("oldest", "newest", "batch")


async def latest_groups(hs: HomeServer, room_id: str, count: int) -> list[int]:
    """The room's ``count`` latest distinct state groups, oldest first."""
    rows = await hs.get_datastores().main.db_pool.execute(
        "nidstate_bench_latest_groups",
        "SELECT esg.state_group, MAX(e.stream_ordering) FROM events AS e"
        " JOIN event_to_state_groups AS esg USING (event_id)"
        " WHERE e.room_id = ? GROUP BY esg.state_group"
        " ORDER BY MAX(e.stream_ordering) DESC LIMIT ?",
        room_id,
        count,
    )
    return [row[0] for row in reversed(rows)]


async def measure(config_path: str, room_id: str, count: int, order: str) -> dict[str, Any]:
    from benchmarks.mix import _start
    from benchmarks.run import lru_memory
    from synapse_nidstate.demo.inprocess import stop_homeserver
    from synapse_nidstate.runtime.module import module_for
    from synapse_nidstate.storage import ResolvedState

    _, hs = await _start(config_path)
    try:
        module = module_for(hs)
        if module is None:
            raise SystemExit(f"{config_path} does not configure synapse-nidstate")
        groups = await latest_groups(hs, room_id, count)
        if not groups:
            raise SystemExit(f"no state group of {room_id} found")
        module.lookups.clear_caches(hs)
        read = hs.get_datastores().state._get_state_for_groups
        if order == "batch":
            await read(groups, StateFilter.all())
        else:
            for group in groups if order == "oldest" else groups[::-1]:
                await read([group], StateFilter.all())
        cache = module.store.named_caches["nidstate_resolved_state"]
        kinds = {"bases": [0, 0], "changes": [0, 0]}
        for node in list(cache.cache.values()):  # type: ignore[union-attr]
            kind = kinds["bases" if isinstance(node.value, ResolvedState) else "changes"]
            kind[0] += 1
            kind[1] += len(node.value)
        entries, size = lru_memory(cache)
    finally:
        await stop_homeserver(hs)
    return {
        "room": room_id,
        "groups": len(groups),
        "order": order,
        "cache_entries": entries,
        "bytes": size,
        "bases": kinds["bases"][0],
        "base_state_entries": kinds["bases"][1],
        "changes": kinds["changes"][0],
        # (ResolvedChanges counts one more than its changes: its base.)
        "change_entries": kinds["changes"][1] - kinds["changes"][0],
    }


def report(result: dict[str, Any]) -> str:
    return (
        f"{result['groups']} latest state groups of {result['room']}, read {result['order']}:"
        f" {result['bases']} bases ({result['base_state_entries']:,} state entries),"
        f" {result['changes']} as changes ({result['change_entries']:,} changed keys);"
        f" {result['bytes'] / 2**20:.1f} MiB (pympler)"
    )


def main(argv: list[str] | None = None) -> int:
    from synapse_nidstate.commands.homeserver import run_in_reactor

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resolved_cache", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--homeserver-config", metavar="HOMESERVER_YAML", required=True)
    parser.add_argument("--room", required=True, help="the room whose state groups are read")
    parser.add_argument("--groups", type=int, default=167, help="how many of its latest groups")
    parser.add_argument("--order", choices=ORDERS, default="oldest")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.groups < 1:
        parser.error("--groups must be at least 1")
    result = run_in_reactor(
        lambda: measure(args.homeserver_config, args.room, args.groups, args.order),
        "nidstate-benchmark-resolved-cache",
    )
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
