"""State-at-event lookup timings, Synapse's native path against the mirror, in one process.

Used by the demo and the benchmarks. Each lookup is timed on the same events
both ways, alternating, *cold* (every cache of Synapse's state path and of the
module emptied before each lookup) or *warm* (asked once before it is timed).
"""

import contextlib
import functools
import statistics
import time
from collections.abc import Awaitable, Callable

import attr
from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.types.state import StateFilter

from synapse_nidstate.runtime.lookups import StateLookups


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Timing:
    lookup: str
    cache: str  # "cold" or "warm"
    samples: int
    native_p50: float
    native_p95: float
    nid_p50: float
    nid_p95: float

    @property
    def speedup_p50(self) -> float:
        return self.native_p50 / self.nid_p50 if self.nid_p50 else float("inf")


def _timing(lookup: str, cache: str, native: list[float], nid: list[float]) -> Timing:
    return Timing(
        lookup,
        cache,
        len(native),
        _percentile(native, 50),
        _percentile(native, 95),
        _percentile(nid, 50),
        _percentile(nid, 95),
    )


def clear_state_caches(hs: HomeServer, lookups: StateLookups) -> None:
    """Empty Synapse's state-at-event caches and the module's."""
    lookups.clear_caches(hs)


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def lookup_filters(member: str, other_members: list[str]) -> dict[str, StateFilter]:
    """What Synapse asks: full state, one member (visibility), lazy-loaded members."""
    return {
        "full state": StateFilter.all(),
        "one member key": StateFilter.from_types([(EventTypes.Member, member)]),
        "lazy-load members": StateFilter.from_lazy_load_member_list(
            [member, *other_members[:4]]
        ),
    }


def visibility_filter(member: str) -> StateFilter:
    """What /messages asks for a page of events: history visibility and the member."""
    return StateFilter.from_types(
        [(EventTypes.RoomHistoryVisibility, ""), (EventTypes.Member, member)]
    )


#: At least this many timings of the batch lookup, both ways (see time_lookups).
MIN_BATCH_SAMPLES = 15


async def time_lookups(
    hs: HomeServer,
    lookups: StateLookups,
    event_ids: list[str],
    member: str,
    other_members: list[str],
    cold: bool,
    batch: int = 100,
) -> list[Timing]:
    """Time each filter on each event, and batches of ``batch`` events, both ways."""
    cache = "cold" if cold else "warm"

    async def measure(
        call: Callable[[list[str], StateFilter], Awaitable[object]],
        group: list[str],
        state_filter: StateFilter,
    ) -> float:
        if cold:
            clear_state_caches(hs, lookups)
        else:
            await call(group, state_filter)
        started = time.perf_counter()
        await call(group, state_filter)
        return time.perf_counter() - started

    await lookups.check_timeable()
    native_ids = functools.partial(lookups.native_state_ids, fresh=False, alone=True)
    results = []
    filters = lookup_filters(member, other_members)
    visibility = visibility_filter(member)
    cases: list[tuple[str, StateFilter, list[list[str]]]] = [
        (name, state_filter, [[e] for e in event_ids]) for name, state_filter in filters.items()
    ]
    batches = [event_ids[i : i + batch] for i in range(0, len(event_ids), batch)]
    batches = [b for b in batches if len(b) == batch] or batches[:1]
    # Each batch timed as often as it takes to make MIN_BATCH_SAMPLES: with
    # three, each of them could be a connection's first use of the module's
    # prepared statements for a batch (their PREPARE, and the generic plan's
    # planning at the first EXECUTE), which a server pays once a connection.
    rounds = -(-MIN_BATCH_SAMPLES // len(batches))
    cases.append((f"batch of {len(batches[0])} events", visibility, batches * rounds))
    for name, state_filter, groups in cases:
        native, nid = [], []
        for group in groups:
            # Synapse's own reads; its caches are emptied by `cold`, kept warm otherwise.
            native.append(await measure(native_ids, group, state_filter))
            nid.append(await measure(lookups.mirrored_state_ids, group, state_filter))
        results.append(_timing(name, cache, native, nid))
    return results


def format_timings(timings: list[Timing]) -> list[tuple[str, ...]]:
    return [
        (
            t.lookup,
            t.cache,
            str(t.samples),
            f"{t.native_p50 * 1000:.2f}",
            f"{t.nid_p50 * 1000:.2f}",
            f"{t.native_p95 * 1000:.2f}",
            f"{t.nid_p95 * 1000:.2f}",
            f"{t.speedup_p50:.1f}x",
        )
        for t in timings
    ]


TIMING_HEADER = (
    "lookup",
    "caches",
    "n",
    "native p50 ms",
    "NID p50 ms",
    "native p95 ms",
    "NID p95 ms",
    "speed-up p50",
)


async def time_group_reads(
    hs: HomeServer,
    lookups: StateLookups,
    groups: list[int],
    member: str,
    other_members: list[str],
    cold: bool,
) -> list[Timing]:
    """Synapse's reads of one state group, native against the module's:
    ``_get_state_for_groups`` with each filter (what Synapse's callers call:
    native, Synapse's per-group caches and its read of ``state_groups_state``;
    the module's, its own caches standing in for Synapse's and its read of
    the snapshots), and ``get_state_group_delta`` (Synapse's cache emptied
    before each)."""
    group_reads = lookups.group_reads
    assert group_reads is not None, "the module does not serve state-group reads here"
    await group_reads.check_timeable()
    state = hs.get_datastores().state
    cache = "cold" if cold else "warm"

    async def read(group: int, state_filter: StateFilter) -> object:
        return await state._get_state_for_groups([group], state_filter)

    async def delta(group: int, state_filter: StateFilter) -> object:
        state.get_state_group_delta.invalidate_all()
        return await state.get_state_group_delta(group)  # type: ignore[call-arg, arg-type, misc]

    async def measure(
        call: Callable[[int, StateFilter], Awaitable[object]],
        group: int,
        state_filter: StateFilter,
        native: bool,
    ) -> float:
        guard = group_reads.native_only(fresh=False, alone=True)
        if cold:
            clear_state_caches(hs, lookups)
        elif not native:
            # Serving, Synapse's per-group caches hold no group the module
            # answers: the native side's reads just put this one there, so it
            # goes as the mirror's copies go once written (group_reads), or it
            # would answer the module's side from Synapse's caches.
            group_reads.forget_synapse_copies([group])
        with guard if native else contextlib.nullcontext():
            if not cold:
                await call(group, state_filter)
            started = time.perf_counter()
            await call(group, state_filter)
            return time.perf_counter() - started

    cases: list[tuple[str, Callable[[int, StateFilter], Awaitable[object]], StateFilter]] = [
        (f"state group: {name}", read, state_filter)
        for name, state_filter in lookup_filters(member, other_members).items()
    ]
    cases.append(("state group delta", delta, StateFilter.all()))
    results = []
    for name, call, state_filter in cases:
        native, nid = [], []
        for group in groups:
            native.append(await measure(call, group, state_filter, True))
            nid.append(await measure(call, group, state_filter, False))
        results.append(_timing(name, cache, native, nid))
    return results
