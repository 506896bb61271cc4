"""A realistic mix of state lookups: a replay across all rooms, as a busy server asks them.

The trace is drawn once (seeded) from the dataset and replayed both ways, from
cold (every state cache emptied once, at the start of a replay, then kept: both
sides with their default sizes), Synapse's own reads against the mirror's:

* ``/messages`` (weight 6): a page of 10 consecutive events of a room; their
  visibility (history visibility and the requester's membership at each, what
  ``filter_events_for_client`` asks), then the lazy-loaded members of the
  page's senders at its first event;
* ``/context`` (weight 2): the 5 events before and after one; their visibility,
  then the lazy-loaded members of their senders at the event;
* an initial sync of a room (weight 1): the full state at its latest event.

Rooms come up in proportion to their events (a random event picks the room),
so the big room, the busiest, is asked most. Each request's answers are
digested on both sides and compared: a difference is a mismatch.

As a command, the mix in a process of its own, for the memory an operator
sees (``benchmarks.run`` runs it twice, with and without the module):

    python -m benchmarks.mix --homeserver-config YAML --requests N --write-trace TRACE
    python -m benchmarks.mix --homeserver-config YAML --trace TRACE --json FILE

draws the trace in a process of its own (the first command: the history's
events, a million at HQ scale, are never held by a measured process), then
starts a homeserver from the file, replays the trace once from cold through
Synapse's own entry point (``get_state_ids_for_events``, which the module
serves when the file configures it) and writes the process's resident memory
after start-up, after the replay and at its peak (``/proc/self/status``:
VmRSS, VmHWM), what glibc's allocator holds after the replay (in use, and
freed but kept: ``mallinfo2``), with a digest of every answer.
"""

import argparse
import ctypes
import gc
import hashlib
import json
import logging
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attr
from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.storage.database import LoggingTransaction
from synapse.types import MutableStateMap
from synapse.types.state import StateFilter
from synapse.util.caches.lrucache import LruCache

from benchmarks import REPO

PAGE = 10
CONTEXT = 5
#: (kind, weight)
KINDS = (("/messages", 6), ("/context", 2), ("initial sync", 1))

Lookup = Callable[[list[str], StateFilter], Awaitable[dict[str, MutableStateMap[str]]]]


@attr.s(frozen=True, auto_attribs=True)
class Request:
    kind: str
    #: The lookups it makes, in order: (event IDs, filter).
    calls: tuple[tuple[tuple[str, ...], StateFilter], ...]


@attr.s(frozen=True, auto_attribs=True)
class Replay:
    seconds: float
    digests: list[bytes]


async def timelines(hs: HomeServer) -> dict[str, list[tuple[str, str]]]:
    """Every room's events with state, in stream order, as (event ID, sender)."""

    def timelines_txn(txn: LoggingTransaction) -> dict[str, list[tuple[str, str]]]:
        txn.execute(
            "SELECT e.room_id, e.event_id, e.sender FROM events AS e"
            " JOIN event_to_state_groups AS esg ON esg.event_id = e.event_id"
            " WHERE NOT e.outlier ORDER BY e.stream_ordering"
        )
        rooms: dict[str, list[tuple[str, str]]] = {}
        for room_id, event_id, sender in txn:
            rooms.setdefault(room_id, []).append((event_id, sender))
        return rooms

    return await hs.get_datastores().main.db_pool.runInteraction(
        "bench_timelines", timelines_txn
    )


def _visibility(requester: str) -> StateFilter:
    return StateFilter.from_types(
        [(EventTypes.RoomHistoryVisibility, ""), (EventTypes.Member, requester)]
    )


def _lazy_members(senders: Sequence[str]) -> StateFilter:
    return StateFilter.from_lazy_load_member_list(sorted(set(senders)))


def draw_trace(rooms: dict[str, list[tuple[str, str]]], requests: int, seed: int) -> list[Request]:
    """``requests`` requests drawn from ``rooms`` (see the module's docstring)."""
    rng = random.Random(seed)
    everything = [(room_id, i) for room_id, events in rooms.items() for i in range(len(events))]
    kinds = [kind for kind, _ in KINDS]
    weights = [weight for _, weight in KINDS]
    trace = []
    for _ in range(requests):
        room_id, position = rng.choice(everything)
        events = rooms[room_id]
        kind = rng.choices(kinds, weights)[0]
        if kind == "/messages":
            start = max(0, min(position, len(events) - PAGE))
            page = events[start : start + PAGE]
        elif kind == "/context":
            page = events[max(0, position - CONTEXT) : position + CONTEXT + 1]
        else:
            trace.append(Request(kind, (((events[-1][0],), StateFilter.all()),)))
            continue
        requester = rng.choice(page)[1]
        ids = tuple(e for e, _ in page)
        at = ids[0] if kind == "/messages" else events[position][0]
        trace.append(
            Request(
                kind,
                (
                    (ids, _visibility(requester)),
                    ((at,), _lazy_members([s for _, s in page])),
                ),
            )
        )
    return trace


def trace_to_json(trace: Sequence[Request]) -> list[dict[str, Any]]:
    """A trace as JSON (``--write-trace``): each call's event IDs and filter."""
    return [
        {
            "kind": request.kind,
            "calls": [
                {
                    "events": list(ids),
                    "types": {
                        t: None if keys is None else sorted(keys)
                        for t, keys in state_filter.types.items()
                    },
                    "include_others": state_filter.include_others,
                }
                for ids, state_filter in request.calls
            ],
        }
        for request in trace
    ]


def trace_from_json(data: list[dict[str, Any]]) -> list[Request]:
    """:func:`trace_to_json`'s inverse (the filters equal the drawn ones)."""
    return [
        Request(
            request["kind"],
            tuple(
                (tuple(call["events"]), StateFilter.freeze(call["types"], call["include_others"]))
                for call in request["calls"]
            ),
        )
        for request in data
    ]


def _digest(answers: Sequence[dict[str, MutableStateMap[str]]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for answer in answers:
        for event_id in sorted(answer):
            h.update(event_id.encode())
            for (event_type, state_key), value in sorted(answer[event_id].items()):
                h.update(f"\0{event_type}\0{state_key}\0{value}".encode())
            h.update(b"\1")
        h.update(b"\2")
    return h.digest()


async def replay(
    trace: Sequence[Request],
    lookup: Lookup,
    clear_caches: Callable[[], None],
    peaks: dict[str, list[int]] | None = None,
) -> Replay:
    """The whole trace through ``lookup``, from cold: wall time and digests.
    With ``peaks`` (``tracemalloc`` running), each request's peak of traced
    memory above what was traced when it started goes into it, by kind."""
    clear_caches()
    digests = []
    started = time.perf_counter()
    for request in trace:
        if peaks is not None:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
        answers = [await lookup(list(ids), state_filter) for ids, state_filter in request.calls]
        if peaks is not None:
            peaks.setdefault(request.kind, []).append(tracemalloc.get_traced_memory()[1] - before)
        digests.append(_digest(answers))
    return Replay(time.perf_counter() - started, digests)


def peak_summary(peaks: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """Each kind's requests' peaks (``replay``): how many, p50, p90 and max, in bytes."""
    summary = {}
    for kind, values in peaks.items():
        values = sorted(values)
        summary[kind] = {
            "requests": len(values),
            "p50": values[len(values) // 2],
            "p90": values[int(len(values) * 0.9)],
            "max": values[-1],
        }
    return summary


def resident_memory(pid: int | str = "self") -> dict[str, int]:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in bytes;
    this process's by default."""
    memory = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                memory["now" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
    return memory


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (``malloc.h``, glibc 2.33 and later)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def malloc_statistics() -> dict[str, int] | None:
    """What glibc's allocator holds in this process (``mallinfo2``, every
    arena summed), in bytes: ``heap`` (from the system, outside mmap), of it
    ``in_use`` and ``free`` (freed, kept by the allocator: what RSS counts
    beyond the live objects, where its pages are touched), ``mmapped`` (big
    blocks mapped one by one) and ``trimmable`` (free at the heap's top);
    None where the C library is not glibc or is older than 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"heap": info.arena, "in_use": info.uordblks, "free": info.fordblks,
            "mmapped": info.hblkhd, "trimmable": info.keepcost}


#: With --trace-memory: how many allocation sites (by file) to report.
TRACED_FILES = 12


def traced_growth(before: Any, after: Any) -> list[dict[str, Any]]:
    """What the replay's surviving allocations were, by the file that made them
    (``tracemalloc`` snapshots before and after), largest first."""
    return [
        {"file": os.path.relpath(stat.traceback[0].filename, REPO)
         if stat.traceback[0].filename.startswith(REPO) else
         stat.traceback[0].filename.split("site-packages/")[-1],
         "bytes": stat.size_diff, "blocks": stat.count_diff}
        for stat in after.compare_to(before, "filename")[:TRACED_FILES]
    ]


def synapse_state_caches(hs: HomeServer) -> dict[str, LruCache]:
    """Synapse's state caches (the ``LruCache`` under each), by name: its two
    per-group caches and its event -> state group cache."""
    state, main = hs.get_datastores().state, hs.get_datastores().main
    return {
        "state_group_cache": state._state_group_cache.cache,
        "state_group_members_cache": state._state_group_members_cache.cache,
        "_get_state_group_for_event": main._get_state_group_for_event.cache.cache,
    }


def _state_caches(hs: HomeServer) -> dict[str, LruCache]:
    from synapse_nidstate.runtime.module import module_for

    caches = dict(synapse_state_caches(hs))
    module = module_for(hs)
    if module is not None:
        caches.update(module.store.named_caches)
    return caches


def cache_entries(hs: HomeServer) -> dict[str, int]:
    """Entries of Synapse's state caches and of the module's, by name, as
    each cache counts its size (a cache sized by keys counts keys)."""
    return {name: len(cache) for name, cache in _state_caches(hs).items()}


def cache_nodes(hs: HomeServer) -> dict[str, int]:
    """The ``LruCache`` nodes each of those caches holds (what costs memory
    per entry, whatever an entry's size)."""
    return {name: len(cache.cache) for name, cache in _state_caches(hs).items()}  # type: ignore[arg-type]


def _releases(hs: HomeServer) -> dict[str, float] | None:
    """How often the module gave freed memory back, and the seconds it took;
    None without the module."""
    from synapse_nidstate.runtime.module import module_for

    module = module_for(hs)
    if module is None:
        return None
    return {"releases": module.freed_memory.releases, "seconds": module.freed_memory.seconds}


async def _start(config_path: str) -> tuple[dict[str, Any], HomeServer]:
    """A homeserver started from a homeserver.yaml, and the file's config."""
    import yaml

    from synapse_nidstate.demo.inprocess import start_homeserver

    with open(config_path) as f:
        config = yaml.safe_load(f)
    return config, await start_homeserver(config, os.path.dirname(os.path.abspath(config_path)))


async def _drawn_trace(hs: HomeServer, requests: int) -> list[Request]:
    """The mix's trace of ``requests`` requests, drawn from ``hs``'s history."""
    return draw_trace(await timelines(hs), requests, seed=12)


async def write_trace(config_path: str, requests: int, path: str) -> None:
    """Draw the trace from the database ``config_path`` opens and write it to
    ``path`` (``--write-trace``): in a process of its own, so that the
    measured processes never hold every event of the history (a million
    at HQ scale, half a GiB, whose freed memory the caches would then
    fill without the process growing)."""
    from synapse_nidstate.demo.inprocess import stop_homeserver

    _, hs = await _start(config_path)
    try:
        trace = await _drawn_trace(hs, requests)
    finally:
        await stop_homeserver(hs)
    with open(path, "w") as f:
        json.dump(trace_to_json(trace), f)


async def measure_process(
    config_path: str,
    requests: int,
    trace_memory: bool = False,
    trace_path: str | None = None,
    settle: float = 0,
) -> dict[str, Any]:
    """The replay from cold in this process (see the module's doc), of the
    trace in ``trace_path`` (``--trace``) or of one drawn here; the memory
    after it read ``settle`` seconds after it ends (``--settle``)."""
    from synapse_nidstate.demo.inprocess import stop_homeserver

    config, hs = await _start(config_path)
    try:
        if trace_path is None:
            trace = await _drawn_trace(hs, requests)
        else:
            with open(trace_path) as f:
                trace = trace_from_json(json.load(f))
        gc.collect()
        if trace_memory:
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
        started = resident_memory()
        controller = hs.get_storage_controllers().state

        async def lookup(ids: list[str], state_filter: StateFilter) -> dict[str, MutableStateMap[str]]:
            return dict(await controller.get_state_ids_for_events(ids, state_filter))  # type: ignore[arg-type]

        peaks: dict[str, list[int]] | None = {} if trace_memory else None
        replayed = await replay(trace, lookup, lambda: None, peaks)
        gc.collect()
        if settle:
            from synapse.logging.context import make_deferred_yieldable
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            # (Made yieldable: the sleep leaves this task's logging context,
            # as Synapse's own waits do.)
            await make_deferred_yieldable(deferLater(reactor, settle, lambda: None))  # type: ignore[arg-type]
        after = resident_memory()
        allocator = malloc_statistics()
        released = _releases(hs)
        traced = {}
        if trace_memory:
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            assert peaks is not None
            traced = {"traced_growth": traced_growth(before, snapshot),
                      "traced_after": sum(stat.size for stat in snapshot.statistics("filename")),
                      "request_peaks": peak_summary(peaks),
                      "cache_entries": cache_entries(hs),
                      "cache_nodes": cache_nodes(hs)}
    finally:
        await stop_homeserver(hs)
    return {
        **traced,
        "module": bool(config.get("modules")),
        "requests": len(trace),
        "seconds": replayed.seconds,
        "rss_started": started["now"],
        "rss_after": after["now"],
        "rss_peak": after["peak"],
        "malloc_after": allocator,
        # The module's releases of freed memory (runtime/freed_memory.py): how many, seconds.
        "freed_memory_releases": released,
        "digest": hashlib.blake2b(b"".join(replayed.digests), digest_size=16).hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    from synapse_nidstate.commands.homeserver import run_in_reactor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.mix", description=__doc__.split("\n")[0])
    parser.add_argument("--homeserver-config", required=True, metavar="YAML")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE", help="where the measures go")
    parser.add_argument(
        "--write-trace", metavar="FILE",
        help="only draw the trace of --requests requests and write it to FILE",
    )
    parser.add_argument(
        "--trace", metavar="FILE",
        help="replay the trace in FILE (from --write-trace) instead of drawing one here, "
        "which holds every event of the history in the measured process meanwhile",
    )
    parser.add_argument(
        "--trace-memory", action="store_true",
        help="also record, with tracemalloc, which files allocated what the replay left "
        "behind, each request's peak by kind, and every state cache's entries (slower; "
        "its RSS is not comparable)",
    )
    parser.add_argument(
        "--settle", type=float, default=0, metavar="SECONDS",
        help="read the memory after the replay this many seconds after it ends, the "
        "homeserver idle meanwhile (jemalloc, which Synapse's FAQ advises, returns freed "
        "pages to the system after a delay: 10 s by default)",
    )
    args = parser.parse_args(argv)
    if args.settle < 0:
        parser.error("--settle must be 0 or more")
    if (args.json is None) == (args.write_trace is None):
        parser.error("give one of --json (measure) and --write-trace (draw the trace)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.write_trace is not None:
        run_in_reactor(
            lambda: write_trace(args.homeserver_config, args.requests, args.write_trace),
            "nidstate-benchmark-mix",
        )
        return 0
    measured = run_in_reactor(
        lambda: measure_process(
            args.homeserver_config, args.requests, args.trace_memory, args.trace, args.settle
        ),
        "nidstate-benchmark-mix",
    )
    with open(args.json, "w") as f:
        json.dump(measured, f, indent=2)
    for site in measured.get("traced_growth", []):
        print(f"{site['bytes'] / 2**20:8.2f} MiB {site['blocks']:9,} blocks  {site['file']}")
    for kind, peak in measured.get("request_peaks", {}).items():
        print(
            f"{kind:14} {peak['requests']:5} requests, traced peak above their start:"
            f" p50 {peak['p50'] / 2**20:.2f}, p90 {peak['p90'] / 2**20:.2f},"
            f" max {peak['max'] / 2**20:.2f} MiB"
        )
    allocator = measured["malloc_after"]
    if allocator is not None:
        print("glibc's allocator after the replay (MiB): " + ", ".join(
            f"{name} {value / 2**20:.1f}" for name, value in allocator.items()))
    released = measured["freed_memory_releases"]
    if released is not None:
        print(f"the module released freed memory {released['releases']} times, in "
              f"{released['seconds'] * 1000:.1f} ms in all")
    nodes = measured.get("cache_nodes", {})
    for name, entries in measured.get("cache_entries", {}).items():
        print(f"{entries:9,} entries {nodes.get(name, 0):9,} nodes  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
