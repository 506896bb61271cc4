"""Reclaim and restore, room by room: what the CLI, the background job and
the eager setting run (the proof and the writes are ``storage.reclaim``'s).

Each batch is one transaction: the groups it proves lose their rows and gain
their ``nidstate_reclaimed_groups`` row together, so a kill at any point
leaves every group either reclaimed (and answered from its snapshot) or
untouched; a rerun starts over with what is left. Memory is one batch's states.

Which groups keep their rows: groups without a snapshot (not mirrored yet,
partial-state, a failed plan: their reads walk Synapse's rows), every group of
a room Synapse holds in partial state, and groups whose proof fails (counted
and logged).
"""

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import attr
from synapse.storage.database import LoggingTransaction

from synapse_nidstate.runtime.metrics import ReclaimStats
from synapse_nidstate.storage import NidStore
from synapse_nidstate.storage.reclaim import ReclaimOutcome

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

#: Refused groups logged one by one; after that, only counted.
MAX_LOGGED_REFUSALS = 20


class DryRun(Exception):
    """Raised inside a dry run's transaction so that it rolls back."""

    def __init__(self, last: int, outcome: ReclaimOutcome) -> None:
        self.last = last
        self.outcome = outcome


@attr.s(slots=True, auto_attribs=True)
class Totals:
    groups: int = 0
    rows: int = 0
    refused: int = 0
    #: Of ``groups``, those proved (or written back) from their delta alone.
    by_delta: int = 0
    #: Of ``groups``, those without a predecessor proved from their rows in NIDs.
    in_nids: int = 0
    #: Rows deleted (or, in a dry run, that would be) per room.
    rows_by_room: dict[str, int] = attr.Factory(dict)


class Reclaimer:
    def __init__(self, hs: "HomeServer", store: NidStore, stats: ReclaimStats, batch_size: int) -> None:
        self._store = store
        self._db_pool = store.db_pool
        self._state_is_main = hs.get_datastores().state.db_pool is store.db_pool
        self.stats = stats
        self.batch_size = batch_size
        self._logged = 0
        # The background job's pass: rooms left, and where each one stands.
        self._pass: list[str] = []
        self._cursors: dict[str, int] = {}

    def check_possible(self) -> None:
        """Raise RuntimeError where groups cannot be reclaimed at all."""
        if not self._state_is_main:
            raise RuntimeError(
                "the state database is not the main database: reclaim needs Synapse's "
                "state groups and the NID tables in one database (one transaction proves "
                "and deletes)"
            )

    def check_possible_at_start_up(self) -> None:
        """As :meth:`check_possible`, as the error that stops Synapse at start-up."""
        from synapse.config._base import ConfigError

        try:
            self.check_possible()
        except RuntimeError as e:
            raise ConfigError(f"synapse-nidstate: {e}", ("modules", "synapse_nidstate", "reclaim")) from None

    # -- what is left -------------------------------------------------------

    async def database_totals(self) -> tuple[int, int]:
        """(groups reclaimed, rows deleted) in the whole database."""
        return await self._db_pool.runInteraction(
            "nidstate_reclaimed_totals", self._store.reclaimed_totals_txn
        )

    async def rooms(self, room_id: str | None = None) -> list[str]:
        """Rooms with groups left to reclaim (or ``room_id`` alone)."""
        if room_id is not None:
            return [room_id]

        def rooms_txn(txn: LoggingTransaction) -> list[str]:
            txn.execute(
                "SELECT DISTINCT sg.room_id FROM nidstate_state_groups AS g"
                " JOIN state_groups AS sg ON sg.id = g.state_group"
                " WHERE NOT EXISTS (SELECT 1 FROM nidstate_reclaimed_groups AS r"
                "  WHERE r.state_group = g.state_group)"
                " ORDER BY sg.room_id"
            )
            return [row[0] for row in txn.fetchall()]

        return await self._db_pool.runInteraction("nidstate_reclaim_rooms", rooms_txn)

    async def remaining(self, room_id: str | None = None) -> int:
        """Groups with a snapshot and not reclaimed (in ``room_id``)."""

        def remaining_txn(txn: LoggingTransaction) -> int:
            where = "" if room_id is None else " AND sg.room_id = ?"
            txn.execute(
                "SELECT COUNT(*) FROM nidstate_state_groups AS g"
                " JOIN state_groups AS sg ON sg.id = g.state_group"
                " WHERE NOT EXISTS (SELECT 1 FROM nidstate_reclaimed_groups AS r"
                f"  WHERE r.state_group = g.state_group){where}",
                () if room_id is None else (room_id,),
            )
            (count,) = txn.fetchone()  # type: ignore[misc]
            return int(count)

        return await self._db_pool.runInteraction("nidstate_reclaim_remaining", remaining_txn)

    async def reclaimed(self, room_id: str | None = None) -> int:
        """Groups reclaimed (in ``room_id``)."""
        groups, _ = await self._db_pool.runInteraction(
            "nidstate_reclaimed_count", self._store.reclaimed_totals_txn, room_id
        )
        return groups

    # -- reclaim -------------------------------------------------------------

    async def run(
        self,
        room_id: str | None = None,
        progress: Callable[[int], None] | None = None,
        dry_run: bool = False,
    ) -> Totals:
        """Reclaim every group left (in ``room_id``), room by room, oldest first."""
        self.check_possible()
        totals = Totals()
        for room in await self.rooms(room_id):
            after = 0
            while True:
                done = await self.reclaim_batch(room, after, dry_run)
                if done is None:
                    break
                after, outcome = done
                totals.groups += outcome.groups
                totals.rows += outcome.rows
                totals.refused += len(outcome.refused)
                totals.by_delta += outcome.by_delta
                totals.in_nids += outcome.in_nids
                if outcome.rows:
                    totals.rows_by_room[room] = totals.rows_by_room.get(room, 0) + outcome.rows
                if progress is not None:
                    progress(outcome.groups + len(outcome.refused))
        return totals

    async def reclaim_batch(
        self, room_id: str, after: int, dry_run: bool = False
    ) -> tuple[int, ReclaimOutcome] | None:
        """One transaction: the room's next groups above ``after`` proved and
        reclaimed; (last group looked at, outcome), or None if none was left."""

        def batch_txn(txn: LoggingTransaction) -> tuple[int, ReclaimOutcome] | None:
            groups = self._store.reclaim_candidates_txn(txn, room_id, after, self.batch_size)
            if not groups:
                return None
            outcome = self._store.reclaim_groups_txn(txn, room_id, groups)
            if dry_run:
                raise DryRun(max(groups), outcome)
            return max(groups), outcome

        try:
            done = await self._db_pool.runInteraction("nidstate_reclaim", batch_txn)
        except DryRun as e:  # rolled back: nothing changed
            done = (e.last, e.outcome)
        if done is None:
            return None
        self._count(room_id, done[1], counted=not dry_run)
        return done

    async def background_batch(self) -> None:
        """One batch of the background job. A pass goes over the rooms that had
        groups left when it began, oldest groups first; groups refused in a pass
        are tried again in the next."""
        if not self._pass:
            self._pass = await self.rooms()
            self._cursors = {}
            if not self._pass:
                return
        room = self._pass[0]
        done = await self.reclaim_batch(room, self._cursors.get(room, 0))
        if done is None:
            self._pass.pop(0)
        else:
            self._cursors[room] = done[0]

    def reclaim_txn(self, txn: LoggingTransaction, room_id: str, groups: list[int]) -> None:
        """Eager: reclaim ``groups`` in the caller's transaction (the persistence
        that mirrored them); counted once it commits."""
        outcome = self._store.reclaim_groups_txn(txn, room_id, groups)
        txn.call_after(self._count, room_id, outcome)

    def _count(self, room_id: str, outcome: ReclaimOutcome, counted: bool = True) -> None:
        if counted:
            self.stats.groups_reclaimed += outcome.groups
            self.stats.rows_deleted += outcome.rows
            self.stats.groups_refused += len(outcome.refused)
        for group in outcome.refused:
            if self._logged < MAX_LOGGED_REFUSALS:
                self._logged += 1
                logger.warning(
                    "synapse-nidstate: state group %d of %s keeps its rows: Synapse's "
                    "answer from them differs from its snapshot (run verify --room)",
                    group,
                    room_id,
                )

    # -- restore -------------------------------------------------------------

    async def restore(
        self, room_id: str | None = None, progress: Callable[[int], None] | None = None
    ) -> Totals:
        """Write back the rows of every reclaimed group (in ``room_id``), newest first."""
        totals = Totals()

        def rooms_txn(txn: LoggingTransaction) -> list[str]:
            return self._store.reclaimed_rooms_txn(txn)

        rooms = (
            [room_id]
            if room_id is not None
            else await self._db_pool.runInteraction("nidstate_restore_rooms", rooms_txn)
        )
        for room in rooms:
            while True:

                def batch_txn(txn: LoggingTransaction, room: str = room) -> ReclaimOutcome | None:
                    groups = self._store.reclaimed_in_room_txn(txn, room, self.batch_size)
                    if not groups:
                        return None
                    return self._store.restore_groups_txn(txn, groups)

                outcome = await self._db_pool.runInteraction("nidstate_restore", batch_txn)
                if outcome is None:
                    break
                self.stats.groups_restored += outcome.groups
                self.stats.rows_restored += outcome.rows
                totals.groups += outcome.groups
                totals.rows += outcome.rows
                totals.by_delta += outcome.by_delta
                if progress is not None:
                    progress(outcome.groups)
        if totals.rows:
            await self._db_pool.runInteraction(
                "nidstate_restore_analyze", self._store.analyze_restored_txn
            )
        return totals
