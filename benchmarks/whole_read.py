"""`python -m benchmarks.whole_read`: the time and the memory peak of whole-state reads.

A whole read (a full state: an initial sync, ``/state``, a join's state) of
a big room is the read that weighs most on a server's memory: at HQ scale
its answer alone is ~50,000 entries. This command reads the full state at
a room's latest events, one event a read, in three regimes:

* ``native``: Synapse's own read (``get_state_ids_for_events`` with the
  module's state-group reads bypassed), every cache emptied before each read;
* ``nid cold``: the module's read, every cache emptied before each read;
* ``nid blocks kept``: the module's read again, with only the caches that
  hold answers emptied before each read (the resolved-state and split caches,
  and Synapse's), the blocks, block lists and strings kept from the reads
  before: what a server meets once the big room's state is evicted from the
  answers' caches while its blocks stay cached.

Each read runs twice: once timed, once under ``tracemalloc`` for its peak
(the most memory Python held during the read beyond what it held before).
Answers are compared with Synapse's; a difference is an error. On the
database a homeserver.yaml opens (the module configured there, migrated)::

    python -m benchmarks.whole_read --homeserver-config /work/runs/hq/homeserver.yaml \\
        --room '!room0:hq.example' --events 3
"""

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from synapse.server import HomeServer
from synapse.types.state import StateFilter

from synapse_nidstate.commands.verify import latest_room_events_with_state

#: The module's caches that hold answers (emptied in ``nid blocks kept``).
ANSWER_CACHES = ("nidstate_resolved_state", "nidstate_snapshot_parts")

REGIMES = ("native", "nid cold", "nid blocks kept")


def _forget(hs: HomeServer, regime: str) -> None:
    """Empty the caches ``regime`` empties before a read."""
    from synapse_nidstate.runtime.module import module_for

    module = module_for(hs)
    assert module is not None
    if regime == "nid blocks kept":
        stores = hs.get_datastores()
        stores.state._state_group_cache.invalidate_all()
        stores.state._state_group_members_cache.invalidate_all()
        for name in ANSWER_CACHES:
            module.store.named_caches[name].clear()
        module.store._resolved_index.clear()  # kept in step with the resolved-state cache
    else:
        module.lookups.clear_caches(hs)


async def _measured(read: Callable[[], Awaitable[Any]], traced: bool) -> tuple[float, int, Any]:
    """(seconds, tracemalloc peak above the start in bytes or 0, answer) of one read."""
    gc.collect()
    if traced:
        tracemalloc.start()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    answer = await read()
    seconds = time.perf_counter() - started
    peak = 0
    if traced:
        peak = tracemalloc.get_traced_memory()[1] - start
        tracemalloc.stop()
    return seconds, peak, answer


async def measure(config_path: str, room_id: str, events: int) -> dict[str, Any]:
    """Each regime's reads of the room's latest ``events`` events (see the module's doc)."""
    from synapse_nidstate.demo.inprocess import start_homeserver, stop_homeserver
    from synapse_nidstate.runtime.module import module_for

    with open(config_path) as f:
        config = yaml.safe_load(f)
    hs = await start_homeserver(config, os.path.dirname(os.path.abspath(config_path)))
    try:
        module = module_for(hs)
        if module is None:
            raise SystemExit(f"{config_path} does not configure synapse-nidstate")
        lookups = module.lookups
        await lookups.check_timeable()
        event_ids = await latest_room_events_with_state(hs, room_id, events)
        if not event_ids:
            raise SystemExit(f"no event with state in {room_id}")
        whole = StateFilter.all()
        expected = {}
        for event_id in event_ids:
            lookups.clear_caches(hs)
            expected[event_id] = await lookups.native_state_ids([event_id], whole)
        reads: dict[str, Callable[[str], Awaitable[Any]]] = {
            "native": lambda e: lookups.native_state_ids([e], whole, fresh=False, alone=True),
            "nid cold": lambda e: lookups.mirrored_state_ids([e], whole),
            "nid blocks kept": lambda e: lookups.mirrored_state_ids([e], whole),
        }
        results: dict[str, list[dict[str, float]]] = {}
        for regime in REGIMES:
            lookups.clear_caches(hs)
            results[regime] = []
            for event_id in event_ids:
                if regime == "nid blocks kept":
                    await reads[regime](event_id)  # its blocks cached
                figures = {}
                for traced in (False, True):
                    _forget(hs, regime)
                    seconds, peak, answer = await _measured(
                        functools.partial(reads[regime], event_id), traced
                    )
                    if dict(answer) != expected[event_id]:
                        raise SystemExit(f"{regime}: a different answer at {event_id}")
                    figures["peak_mib" if traced else "ms"] = (
                        peak / 2**20 if traced else seconds * 1000
                    )
                figures["entries"] = len(expected[event_id][event_id])
                results[regime].append(figures)
    finally:
        await stop_homeserver(hs)
    return {"room": room_id, "events": len(event_ids), "reads": results}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"full state at the {result['events']} latest events of {result['room']}"
        " (one event a read; p50 over the reads, and each read's figures):"
    ]
    native = statistics.median(r["ms"] for r in result["reads"]["native"])
    for regime, reads in result["reads"].items():
        ms = statistics.median(r["ms"] for r in reads)
        peak = statistics.median(r["peak_mib"] for r in reads)
        each = ", ".join(f"{r['ms']:.0f} ms / {r['peak_mib']:.1f} MiB" for r in reads)
        lines.append(
            f"  {regime:16} p50 {ms:8.1f} ms ({native / ms:.2f}x Synapse), peak {peak:6.1f} MiB"
            f"  [{each}]"
        )
    entries = result["reads"]["native"][0]["entries"]
    lines.append(f"  ({entries:,} entries in the first read's state)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from synapse_nidstate.commands.homeserver import run_in_reactor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.whole_read", description=__doc__.split("\n")[0])
    parser.add_argument("--homeserver-config", metavar="HOMESERVER_YAML", required=True)
    parser.add_argument("--room", required=True, help="the room whose state is read")
    parser.add_argument("--events", type=int, default=3, help="how many of its latest events")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be at least 1")
    result = run_in_reactor(lambda: measure(args.homeserver_config, args.room, args.events))
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
