"""Migration: mirror the events Synapse persisted while the module was not running.

Reads Synapse's own tables: ``events`` joined with ``event_to_state_groups``
(main database) for the events and the state group at each, and the state
groups through Synapse's state store (which may be a separate database).

* **Order and resumption.** Events are taken in stream order, in batches. A
  batch's rows, snapshots and the migration's progress (the range of stream
  orderings done) commit in one transaction, so a run killed at any moment
  resumes where the last batch committed, and ends as an uninterrupted run
  would: every write is an insert-or-select or a conditional update.
  ``run`` plans the next batch (scan, deltas, full states) while one is
  written; the writes themselves stay one at a time, in order.
* **Beside the live mirror.** An event whose state group already has a
  snapshot (built by the live mirror, or for an earlier event of the same
  group) is skipped. A group's row in ``nidstate_state_groups`` is written in
  the same transaction as the blocks and snapshot it names, and the lookups
  reach an event's snapshot through that row, so an event is served only once
  its snapshot is complete. Partial-state events are left to Synapse.
* **Gaps.** After a run the range ``[low, high]`` of stream orderings is done.
  The next run scans upwards from ``high`` (events persisted since, e.g. while
  the module was disabled) and downwards from ``low`` (history backfilled
  since: backfilled events get negative, decreasing stream orderings).
* **Memory.** One batch of events and their state deltas, and full states
  (groups with no usable predecessor) up to :data:`MAX_FULL_STATE_ENTRIES`
  entries plus one: they are read one group at a time and join the batch's
  transaction; past that bound those read so far are written in a
  transaction of their own first (they have no parent, so any order works).
  And, while :meth:`Migrator.run` runs, the last full copies' states it read
  (:data:`MAX_KNOWN_STATE_ENTRIES`).
* **Statements.** A batch's rooms are written together
  (``NidStore.mirror_rooms_txn``): on PostgreSQL each statement is a round
  trip, and a batch touches up to one room per event.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attr
from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.storage.database import LoggingTransaction
from twisted.internet import defer

from synapse_nidstate.runtime.metrics import BlockStringsStats, MigrationStats, MirrorStats
from synapse_nidstate.runtime.mirror import SnapshotPlanner
from synapse_nidstate.storage import EventRow, GroupStep, KnownStates, NidStore, WriteScope

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

_LOW_KEY = "migrate_low_stream_ordering"
_HIGH_KEY = "migrate_high_stream_ordering"

#: How many entries of full states a batch holds in memory before writing them.
MAX_FULL_STATE_ENTRIES = 200_000

#: Entries of full copies' states ``run`` keeps (``KnownStates``), so that the
#: next copy of a room reads only the deltas since: two of HQ's biggest.
MAX_KNOWN_STATE_ENTRIES = 100_000

#: Blocks given their key range (blocks written before schema 5), or their
#: pieces (before schema 8), per transaction.
KEY_RANGE_PAGE = 1000

#: Below any stream ordering Synapse allocates.
_MIN_STREAM = -(2**63) + 1


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _PendingEvent:
    stream_ordering: int
    event_id: str
    room_id: str
    state_group: int


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _Batch:
    """A batch planned (its full states read), not written yet."""

    by_room: dict[str, tuple[list[EventRow], list[GroupStep]]]
    covered: int
    scanned_to: int
    range_key: str
    first_key: str | None
    first_value: int | None

    def groups(self) -> frozenset[int]:
        """The groups it builds."""
        return frozenset(step.group for _, steps in self.by_room.values() for step in steps)

    def done_after(self, low: int | None, high: int | None) -> tuple[int | None, int | None]:
        """The range done once it commits, ``[low, high]`` before."""
        if self.range_key == _HIGH_KEY:
            high = self.scanned_to
        else:
            low = self.scanned_to
        if self.first_key == _LOW_KEY:
            low = self.first_value
        return low, high


async def _nothing_to_wait_for() -> None:
    return None


@attr.s(slots=True, auto_attribs=True)
class MigrationProgress:
    """Where a migration stands: the range of stream orderings done."""

    low: int | None = None
    high: int | None = None
    finished: bool = False


class Migrator:
    def __init__(
        self,
        hs: "HomeServer",
        store: NidStore,
        stats: MirrorStats,
        batch_size: int = 500,
        migration_stats: MigrationStats | None = None,
        block_strings_stats: BlockStringsStats | None = None,
    ) -> None:
        self._main = hs.get_datastores().main.db_pool
        self._store = store
        self._stats = stats
        self.stats = migration_stats if migration_stats is not None else MigrationStats()
        self.block_strings_stats = (
            block_strings_stats if block_strings_stats is not None else BlockStringsStats()
        )
        self._planner = SnapshotPlanner(hs, store, stats)
        self.batch_size = batch_size
        self.progress = MigrationProgress()
        #: Where filling each block column written before its schema (key
        #: ranges, 5; pieces, 8) goes on (a block NID); None once every block
        #: has it (found once per process, then not looked for).
        self._fillers: dict[str, tuple[Callable[..., int | None], int | None]] = {
            "nidstate_fill_key_ranges": (store.fill_key_ranges_txn, 0),
            "nidstate_fill_pieces": (store.fill_pieces_txn, 0),
        }
        #: While ``run`` runs, the full copies' states it read last; None
        #: outside it (the background migration keeps none between batches).
        self._known: KnownStates | None = None

    # --------------------------------------------------------------- reading

    async def stream_range(self) -> tuple[int | None, int | None]:
        def range_txn(txn: LoggingTransaction) -> tuple[int | None, int | None]:
            txn.execute(
                "SELECT key, value FROM nidstate_meta WHERE key IN (?, ?)", (_LOW_KEY, _HIGH_KEY)
            )
            values = {key: int(value) for key, value in txn.fetchall()}
            return values.get(_LOW_KEY), values.get(_HIGH_KEY)

        return await self._main.runInteraction("nidstate_migrate_range", range_txn)

    async def last_stream_ordering(self) -> int | None:
        """The newest stream position of Synapse's events now."""
        return await self._main.runInteraction(
            "nidstate_migrate_until", self._last_stream_ordering_txn
        )

    async def remaining(self) -> int:
        """Events whose state group has no snapshot yet (an estimate while live)."""

        def remaining_txn(txn: LoggingTransaction) -> int:
            txn.execute(
                "SELECT COUNT(*) FROM event_to_state_groups AS esg"
                " LEFT JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
                " WHERE g.state_group IS NULL AND NOT EXISTS ("
                "   SELECT 1 FROM partial_state_events AS p WHERE p.event_id = esg.event_id)"
            )
            return txn.fetchone()[0]  # type: ignore[index]

        return await self._main.runInteraction("nidstate_migrate_remaining", remaining_txn)

    def _pending_txn(
        self, txn: LoggingTransaction, after: int, upwards: bool, until: int | None
    ) -> tuple[list[_PendingEvent], int | None, int]:
        """The next batch beyond ``after`` (up to ``until``): the events whose
        group has no snapshot yet, the last stream ordering scanned, and how
        many scanned events the batch covers (all but partial-state ones)."""
        bound = "" if until is None or not upwards else " AND e.stream_ordering <= ?"
        txn.execute(
            "SELECT e.stream_ordering, e.event_id, e.room_id, esg.state_group,"
            "   g.state_group IS NOT NULL,"
            "   EXISTS (SELECT 1 FROM partial_state_events AS p WHERE p.event_id = e.event_id)"
            " FROM events AS e"
            " JOIN event_to_state_groups AS esg ON esg.event_id = e.event_id"
            " LEFT JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
            + (
                " WHERE e.stream_ordering > ?" + bound + " ORDER BY e.stream_ordering ASC LIMIT ?"
                if upwards
                else " WHERE e.stream_ordering < ? ORDER BY e.stream_ordering DESC LIMIT ?"
            ),
            (after, *((until,) if bound else ()), self.batch_size),
        )
        rows = txn.fetchall()
        if not rows:
            return [], None, 0
        pending = [
            _PendingEvent(so, event_id, room_id, group)
            for so, event_id, room_id, group, done, partial in rows
            if not done and not partial
        ]
        return pending, rows[-1][0], sum(1 for row in rows if not row[5])

    # --------------------------------------------------------------- writing

    def _write_batch_txn(
        self,
        txn: LoggingTransaction,
        scope: WriteScope,
        by_room: dict[str, tuple[list[EventRow], list[GroupStep]]],
        range_key: str,
        scanned_to: int,
        first_key: str | None,
        first_value: int | None,
    ) -> None:
        # Every room of the batch at once: a statement count that does not
        # grow with the rooms (a round trip each on PostgreSQL).
        self._store.mirror_rooms_txn(txn, scope, by_room, self._stats)
        for key, value in ((range_key, scanned_to), (first_key, first_value)):
            if key is None or value is None:
                continue
            txn.execute("DELETE FROM nidstate_meta WHERE key = ?", (key,))
            txn.execute(
                "INSERT INTO nidstate_meta (key, value) VALUES (?, ?)", (key, str(value))
            )

    async def _write_steps(self, steps: dict[str, list[GroupStep]]) -> None:
        """Steps of a batch (with full states), in a transaction of their own."""
        await self._main.runInteraction(
            "nidstate_migrate_full_state",
            self._store.mirror_rooms_txn,
            WriteScope(publish=False),
            {room_id: ([], room_steps) for room_id, room_steps in steps.items()},
            self._stats,
        )

    async def _bases(self, steps: list[GroupStep], known_soon: frozenset[int]) -> dict[int, int]:
        """For each step that needs a full state, a group whose snapshot is
        likely close to it: the group of a prev event of one of its events,
        built before it (before this batch, or by an earlier step of it).

        Synapse stores a group in full every 100 hops of a delta chain (and
        after some state resolutions) although its state differs from the
        state before its first event by that event alone; built on such a
        group, the snapshot shares its blocks instead of a compaction of its own.
        """
        full = [s.group for s in steps if s.needs_full_state]
        if not full:
            return {}
        candidates = await self._main.runInteraction(
            "nidstate_migrate_bases", self._store.prev_event_groups_txn, full
        )
        order = {s.group: i for i, s in enumerate(steps)}
        known = set(
            await self._store.known_groups({p for prevs in candidates.values() for p in prevs})
        )
        bases = {}
        for group, prevs in candidates.items():
            usable = [
                p
                for p in prevs
                if p in known or p in known_soon or order.get(p, len(order)) < order[group]
            ]
            if usable:
                bases[group] = max(usable)
        return bases

    async def run_batch(self, until: int | None = None) -> bool:
        """Migrate one batch; False once there is nothing left to scan.

        ``until`` bounds the upward scan (a run stops at the stream position it
        started at, rather than chasing events the live mirror records anyway).
        """
        low, high = await self.stream_range()
        self.progress.low, self.progress.high = low, high
        batch = await self._next_batch(until, low, high, frozenset(), _nothing_to_wait_for)
        if batch is None:
            # History done: blocks written since (the live mirror's
            # compactions) get their strings, a page a step.
            await self.fill_block_strings(max_pages=1)
            return False
        await self._write(batch)
        return True

    async def fill_block_strings(self, max_pages: int | None = None) -> int:
        """Give the blocks that should carry their strings and do not yet
        (``storage/block_strings.py``) their strings, a page a transaction;
        returns how many blocks were filled."""
        filled = await self._store.fill_block_strings(max_pages)
        self.block_strings_stats.by_migration += filled
        return filled

    async def _next_batch(
        self,
        until: int | None,
        low: int | None,
        high: int | None,
        known_soon: frozenset[int],
        before_writing: "Callable[[], Awaitable[None]]",
    ) -> "_Batch | None":
        """Plan the batch after the range ``[low, high]`` done (None: nothing
        left to scan). ``known_soon``: groups a batch being written will have
        built, planned on as if they had their snapshots; ``before_writing``
        waits for that batch, before this one writes anything of its own."""
        if high is None:
            after, upwards, range_key = _MIN_STREAM, True, _HIGH_KEY
        else:
            # New history since the last run first, then new backfill below it.
            pending, scanned, covered = await self._main.runInteraction(
                "nidstate_migrate_pending", self._pending_txn, high, True, until
            )
            if scanned is not None:
                return await self._plan(
                    pending, covered, scanned, _HIGH_KEY, None, None, known_soon, before_writing
                )
            after, upwards, range_key = low if low is not None else high, False, _LOW_KEY
        pending, scanned, covered = await self._main.runInteraction(
            "nidstate_migrate_pending", self._pending_txn, after, upwards, until
        )
        if scanned is None:
            self.progress.finished = True
            self.stats.lag_stream_positions = 0
            return None
        # The first batch of a first run also fixes the low end of the range.
        first_key = _LOW_KEY if high is None else None
        first_value = None
        if first_key is not None:
            first_value = await self._main.runInteraction(
                "nidstate_migrate_first",
                lambda txn: self._first_stream_ordering_txn(txn),
            )
        return await self._plan(
            pending, covered, scanned, range_key, first_key, first_value, known_soon, before_writing
        )

    @staticmethod
    def _last_stream_ordering_txn(txn: LoggingTransaction) -> int | None:
        txn.execute("SELECT MAX(stream_ordering) FROM events")
        row = txn.fetchone()
        return row[0] if row else None

    @staticmethod
    def _first_stream_ordering_txn(txn: LoggingTransaction) -> int | None:
        txn.execute("SELECT MIN(stream_ordering) FROM events")
        row = txn.fetchone()
        return row[0] if row else None

    async def _plan(
        self,
        pending: list[_PendingEvent],
        covered: int,
        scanned_to: int,
        range_key: str,
        first_key: str | None,
        first_value: int | None,
        known_soon: frozenset[int],
        before_writing: "Callable[[], Awaitable[None]]",
    ) -> "_Batch":
        by_room: dict[str, tuple[list[EventRow], list[GroupStep]]] = {}
        for event in pending:
            rows, _ = by_room.setdefault(event.room_id, ([], []))
            rows.append(
                EventRow(
                    event_id=event.event_id,
                    state_group=event.state_group,
                )
            )
        # One plan for the whole batch (its reads cover every room at once);
        # a step belongs to the room of its group, or of the child it is the
        # predecessor of (steps come parents first).
        room_of = {event.state_group: event.room_id for event in pending}
        steps = await self._planner.plan(set(room_of), {}, known_soon)
        for step in reversed(steps):
            if step.prev_group is not None and step.prev_group not in room_of:
                room_of[step.prev_group] = room_of[step.group]
        bases = await self._bases(steps, known_soon)
        chunk: dict[str, list[GroupStep]] = {}
        full_entries = 0
        for step in steps:
            if step.needs_full_state:
                step = await self._planner.with_full_state(
                    step, bases.get(step.group), self._known
                )
                # Read whole, or as a delta on its base.
                entries = len(step.full_state if step.full_state is not None else step.delta or ())
                if full_entries and full_entries + entries > MAX_FULL_STATE_ENTRIES:
                    # The steps so far stand alone (parents come first, and
                    # the batch before has committed).
                    await before_writing()
                    await self._write_steps(chunk)
                    chunk, full_entries = {}, 0
                full_entries += entries
            chunk.setdefault(room_of[step.group], []).append(step)
        for room_id, room_steps in chunk.items():
            by_room.setdefault(room_id, ([], []))[1].extend(room_steps)
        return _Batch(by_room, covered, scanned_to, range_key, first_key, first_value)

    async def _write(self, batch: "_Batch") -> None:
        await self._main.runInteraction(
            "nidstate_migrate_batch",
            self._write_batch_txn,
            WriteScope(publish=False),
            batch.by_room,
            batch.range_key,
            batch.scanned_to,
            batch.first_key,
            batch.first_value,
        )
        self.stats.events_migrated += batch.covered
        self.stats.batches += 1
        newest = await self.last_stream_ordering()
        self.progress.low, self.progress.high = batch.done_after(
            self.progress.low, self.progress.high
        )
        if batch.range_key == _HIGH_KEY and newest is not None:
            self.stats.lag_stream_positions = max(newest - batch.scanned_to, 0)

    async def run(
        self,
        progress: Callable[[int], None] | None = None,
        max_batches: int | None = None,
    ) -> MigrationProgress:
        """Migrate what was persisted before this call (or ``max_batches`` batches).

        Events persisted while it runs are the live mirror's (or the next
        run's, if the module is not running in Synapse).

        Pipelined: the next batch is scanned, planned and its full states read
        while one is written (PostgreSQL works on one, Python on the other);
        the writes stay one at a time and in order, so the range done in
        ``nidstate_meta`` only ever grows by a committed batch, and a run
        killed at any moment resumes as before.
        """
        until = await self.last_stream_ordering()
        low, high = await self.stream_range()
        self.progress.low, self.progress.high = low, high
        batches = 0
        self._known = KnownStates(MAX_KNOWN_STATE_ENTRIES)
        # The batch being written, and its write (Synapse's logcontext rules:
        # started with run_in_background, awaited through make_deferred_yieldable).
        in_flight: tuple[_Batch, defer.Deferred[None]] | None = None

        async def settle() -> None:
            nonlocal in_flight
            if in_flight is None:
                return
            batch, write = in_flight
            in_flight = None
            await make_deferred_yieldable(write)
            if progress is not None:
                progress(batch.covered)

        try:
            while max_batches is None or batches < max_batches:
                batch = await self._next_batch(
                    until, low, high, in_flight[0].groups() if in_flight else frozenset(), settle
                )
                await settle()
                if batch is None:
                    break
                low, high = batch.done_after(low, high)
                in_flight = (batch, run_in_background(self._write, batch))
                batches += 1
            else:
                await settle()
                return self.progress  # more to migrate: the ranges can wait
        finally:
            self._known = None
            await settle()
        # History done: blocks written before schema 5 get their key ranges,
        # and before schema 8 their pieces, a page a transaction (resumable:
        # a filled block is never selected again).
        for name, (fill, after) in self._fillers.items():
            while after is not None and (max_batches is None or batches < max_batches):
                after = await self._store.db_pool.runInteraction(name, fill, after, KEY_RANGE_PAGE)
                self._fillers[name] = (fill, after)
                batches += 1
        return self.progress
