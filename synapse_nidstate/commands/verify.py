"""Comparing the mirror with Synapse's native state-at-event answers, and finding orphans."""

import argparse
import functools
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterable

import attr
from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.storage.database import LoggingTransaction, make_in_list_sql_clause
from synapse.types import StateMap
from synapse.types.state import StateFilter

from synapse_nidstate.commands.homeserver import check_room_exists, nid_store
from synapse_nidstate.commands.ui import WorkProgress
from synapse_nidstate.runtime import hooks
from synapse_nidstate.runtime.group_reads import GroupReads
from synapse_nidstate.runtime.lookups import StateLookups
from synapse_nidstate.runtime.metrics import LookupStats

#: Events compared per lookup at most (what /messages asks at most is 100 too).
BATCH = 100
#: Events in the first batch, before the state's size is known; a batch is at
#: most twice the one before, so that a run meets a big room's states a few
#: events at a time.
FIRST_BATCH = 2
#: State entries one batch's answers may hold per side: bounds the memory of a
#: comparison in rooms of tens of thousands of members, whose full states would
#: otherwise make a batch millions of entries a side. At Matrix HQ's scale
#: (48,561 entries) that is 5 events a batch: a Python state entry costs about
#: 300 bytes, so both sides' answers stay near 150 MB (docs/benchmarks.md).
ENTRY_BUDGET = 250_000
#: Orphans listed by name (all are counted).
MAX_LISTED = 20


@attr.s(auto_attribs=True)
class Mismatch:
    event_id: str
    filter_name: str
    differing_keys: list[tuple[str, str]]


@attr.s(auto_attribs=True)
class VerifyResult:
    events: int = 0
    comparisons: int = 0
    unmirrored: int = 0
    unmirrored_sample: list[str] = attr.Factory(list)
    mismatches: list[Mismatch] = attr.Factory(list)
    #: event -> why the module's read of its state failed (Synapse's rows answer it)
    unreadable: dict[str, str] = attr.Factory(dict)
    #: event -> why its state cannot be read at all (a reclaimed group on its
    #: chain whose snapshot the module cannot read)
    unavailable: dict[str, str] = attr.Factory(dict)

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.unreadable or self.unavailable)


@attr.s(auto_attribs=True)
class Orphans:
    """Mirror rows for state groups Synapse no longer has.

    (Events cannot be orphaned: the lookups reach an event's snapshot through
    Synapse's own ``event_to_state_groups`` row, which goes with the event.)
    """

    groups: int = 0
    group_sample: list[int] = attr.Factory(list)

    @property
    def count(self) -> int:
        return self.groups


def standard_filters(member_sample: Iterable[str]) -> dict[str, StateFilter]:
    """Full state, what visibility checks ask, and what lazy-loading /messages asks."""
    members = list(member_sample)
    return {
        "all": StateFilter.all(),
        "members": StateFilter.from_types([(EventTypes.Member, None)]),
        "lazy_load": StateFilter.from_lazy_load_member_list(members),
        "visibility": StateFilter.from_types(
            [(EventTypes.RoomHistoryVisibility, "")]
            + [(EventTypes.Member, m) for m in members[:1]]
        ),
    }


async def room_events_with_state(hs: HomeServer, room_id: str) -> list[str]:
    """Non-outlier events of a room in stream order (what has state in Synapse)."""
    return [e async for e in events_with_state(hs, room_id=room_id)]


async def latest_room_events_with_state(hs: HomeServer, room_id: str, limit: int) -> list[str]:
    """The room's ``limit`` latest events that have a state group, oldest first
    (one query, where ``room_events_with_state`` pages through the whole room)."""

    def latest_txn(txn: LoggingTransaction) -> list[str]:
        txn.execute(
            "SELECT e.event_id FROM events AS e"
            " JOIN event_to_state_groups AS esg ON esg.event_id = e.event_id"
            " WHERE e.room_id = ? ORDER BY e.stream_ordering DESC LIMIT ?",
            (room_id, limit),
        )
        return [event_id for (event_id,) in txn.fetchall()][::-1]

    return await hs.get_datastores().main.db_pool.runInteraction(
        "nidstate_latest_events", latest_txn
    )


async def events_with_state(
    hs: HomeServer, room_id: str | None = None, page: int = 1000
) -> AsyncIterator[str]:
    """Every event Synapse has a state group for, in stream order, a page at a time."""
    db_pool = hs.get_datastores().main.db_pool

    def page_txn(txn: LoggingTransaction, after: int) -> list[tuple[int, str]]:
        sql = (
            "SELECT e.stream_ordering, e.event_id FROM events AS e"
            " JOIN event_to_state_groups AS esg ON esg.event_id = e.event_id"
            " WHERE e.stream_ordering > ?"
        )
        args: list = [after]
        if room_id is not None:
            sql += " AND e.room_id = ?"
            args.append(room_id)
        txn.execute(sql + " ORDER BY e.stream_ordering LIMIT ?", (*args, page))
        return txn.fetchall()  # type: ignore[return-value]

    after = -(2**63) + 1
    while True:
        rows = await db_pool.runInteraction("nidstate_verify_events", page_txn, after)
        for _, event_id in rows:
            yield event_id
        if len(rows) < page:
            return
        after = rows[-1][0]


async def sample_events_with_state(
    hs: HomeServer, sample: int, room_id: str | None = None
) -> list[str]:
    """A uniform random sample of events with a state group."""

    def sample_txn(txn: LoggingTransaction) -> list[str]:
        sql = "SELECT esg.event_id FROM event_to_state_groups AS esg"
        args: list = []
        if room_id is not None:
            sql += " JOIN events AS e ON e.event_id = esg.event_id WHERE e.room_id = ?"
            args.append(room_id)
        txn.execute(sql + " ORDER BY random() LIMIT ?", (*args, sample))
        return [row[0] for row in txn.fetchall()]

    return await hs.get_datastores().main.db_pool.runInteraction(
        "nidstate_verify_sample", sample_txn
    )


def next_batch_size(events: int, widest: int) -> int:
    """Events in the next batch: as many as fit ``ENTRY_BUDGET`` if each held as
    many entries as the last batch's widest answer (``widest``), at most twice
    the last batch (``events``) and ``BATCH``, at least 1."""
    return max(1, min(BATCH, 2 * events, ENTRY_BUDGET // max(1, widest)))


async def _each(event_ids: Iterable[str] | AsyncIterator[str]) -> AsyncIterator[str]:
    if isinstance(event_ids, AsyncIterator):
        async for event_id in event_ids:
            yield event_id
    else:
        for event_id in event_ids:
            yield event_id


async def compare_with_native(
    lookups: StateLookups,
    event_ids: Iterable[str] | AsyncIterator[str],
    filters: dict[str, StateFilter],
    progress: Callable[[int], None] | None = None,
    after_batch: Callable[[], None] | None = None,
) -> VerifyResult:
    """Compare, per event and filter, the mirror's answer with Synapse's own, in
    batches sized to the state (``next_batch_size``); ``after_batch`` runs
    after each."""
    result = VerifyResult()
    batch: list[str] = []
    size = FIRST_BATCH
    async for event_id in _each(event_ids):
        batch.append(event_id)
        if len(batch) >= size:
            entries = await _compare_batch(lookups, batch, filters, result, progress)
            size = next_batch_size(len(batch), entries)
            batch = []
            if after_batch is not None:
                after_batch()
    if batch:
        await _compare_batch(lookups, batch, filters, result, progress)
    return result


async def _compare_batch(
    lookups: StateLookups,
    batch: list[str],
    filters: dict[str, StateFilter],
    result: VerifyResult,
    progress: Callable[[int], None] | None,
) -> int:
    """Compare one batch; returns the entries of the widest state it answered."""
    widest = 0
    for name, state_filter in filters.items():
        expected, mirrored = await _answers(lookups, batch, state_filter, result)
        widest = max(widest, max((len(state) for state in expected.values()), default=0))
        for event_id in batch:
            if event_id in result.unreadable or event_id in result.unavailable:
                continue
            if event_id not in mirrored:
                if name == "all":
                    result.unmirrored += 1
                    if len(result.unmirrored_sample) < MAX_LISTED:
                        result.unmirrored_sample.append(event_id)
                continue
            result.comparisons += 1
            ours, theirs = mirrored[event_id], expected[event_id]
            if ours != theirs:
                result.mismatches.append(
                    Mismatch(
                        event_id,
                        name,
                        sorted(
                            k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)
                        ),
                    )
                )
        del expected, mirrored  # before the next filter's answers arrive
    result.events += len(batch)
    if progress is not None:
        progress(len(batch))
    return widest


async def _answers(
    lookups: StateLookups, batch: list[str], state_filter: StateFilter, result: VerifyResult
) -> tuple[dict[str, StateMap[str]], dict[str, StateMap[str]]]:
    """Synapse's answers and the mirror's for a batch; where a read fails, each
    event on its own, the failures recorded in ``result`` (``unreadable``: the
    mirror's read; ``unavailable``: Synapse's, a reclaimed group's state)."""
    try:
        return (
            await lookups.native_state_ids(batch, state_filter),
            dict(await lookups.mirrored_state_ids(batch, state_filter)),
        )
    except Exception:
        pass
    expected: dict[str, StateMap[str]] = {}
    mirrored: dict[str, StateMap[str]] = {}
    for event_id in batch:
        try:
            expected.update(await lookups.native_state_ids([event_id], state_filter))
        except Exception as e:
            result.unavailable.setdefault(event_id, f"{type(e).__name__}: {e}")
            continue
        try:
            mirrored.update(await lookups.mirrored_state_ids([event_id], state_filter))
        except Exception as e:
            result.unreadable.setdefault(event_id, f"{type(e).__name__}: {e}")
    return expected, mirrored


async def find_orphans(hs: HomeServer, page: int = 1000) -> Orphans:
    """Mirror rows for state groups Synapse no longer has (bounded memory)."""
    main = hs.get_datastores().main.db_pool
    state = hs.get_datastores().state.db_pool
    orphans = Orphans()

    # The state groups may live in another database: compare a page at a time.
    def our_groups_txn(txn: LoggingTransaction, after: int) -> list[int]:
        txn.execute(
            "SELECT state_group FROM nidstate_state_groups WHERE state_group > ?"
            " ORDER BY state_group LIMIT ?",
            (after, page),
        )
        return [row[0] for row in txn.fetchall()]

    def existing_txn(txn: LoggingTransaction, groups: list[int]) -> set[int]:
        clause, args = make_in_list_sql_clause(txn.database_engine, "id", groups)
        txn.execute(f"SELECT id FROM state_groups WHERE {clause}", args)
        return {row[0] for row in txn.fetchall()}

    after = -1
    while True:
        groups = await main.runInteraction("nidstate_orphan_groups", our_groups_txn, after)
        if not groups:
            break
        existing = await state.runInteraction("nidstate_existing_groups", existing_txn, groups)
        for group in groups:
            if group not in existing:
                orphans.groups += 1
                if len(orphans.group_sample) < MAX_LISTED:
                    orphans.group_sample.append(group)
        after = groups[-1]
    return orphans


async def verify(hs: HomeServer, args: argparse.Namespace) -> int:
    await check_room_exists(hs, args.room)
    controller = hs.get_storage_controllers().state
    store = nid_store(hs)
    lookups = StateLookups(
        controller, store, LookupStats(), "mirror", controller.get_state_ids_for_events
    )
    # Synapse's own answer, where groups are reclaimed too: their state is the
    # snapshot reclaim proved equal to their rows (runtime/group_reads.py).
    hooks.install_group_reads(hs, GroupReads(store, LookupStats(), "native", hs.hostname))
    filters = standard_filters([f"@nobody:{hs.hostname}"])
    if args.sample is not None:
        event_ids = await sample_events_with_state(hs, args.sample, args.room)
        total = len(event_ids)
        source = event_ids
    else:
        total = await _count_events_with_state(hs, args.room)
        source = events_with_state(hs, args.room)  # type: ignore[assignment]
    progress = WorkProgress("verifying", total, enabled=not args.no_progress)
    # Both sides' state caches are emptied after each batch: a sample's states
    # share little, and kept, the caches grow with the sample (docs/benchmarks.md,
    # HQ scale). Memory is then one batch's answers.
    result = await compare_with_native(
        lookups, source, filters, progress, functools.partial(lookups.clear_caches, hs)
    )
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
        "orphan_state_groups": orphans.groups,
        "orphan_state_group_sample": orphans.group_sample,
        "unreadable": len(result.unreadable),
        "unreadable_sample": dict(list(result.unreadable.items())[:MAX_LISTED]),
        "unavailable": len(result.unavailable),
        "unavailable_sample": dict(list(result.unavailable.items())[:MAX_LISTED]),
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
        for group in orphans.group_sample:
            print(f"ORPHAN state group {group}: mirrored, but Synapse no longer has it")
        print(f"orphans: {orphans.groups} state groups")
        for event_id, why in list(result.unreadable.items())[:MAX_LISTED]:
            print(f"UNREADABLE {event_id}: the module's read failed ({why})")
        for event_id, why in list(result.unavailable.items())[:MAX_LISTED]:
            print(f"UNAVAILABLE {event_id}: its reclaimed state cannot be read ({why})")
        if result.unreadable or result.unavailable:
            print(
                f"unreadable (answered by Synapse): {len(result.unreadable)}; "
                f"unavailable (reclaimed, unreadable): {len(result.unavailable)}"
            )
    return 1 if not result.ok or orphans.count else 0


async def _count_events_with_state(hs: HomeServer, room_id: str | None) -> int:
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
