"""Reclaim: delete the ``state_groups_state`` rows of groups the snapshots
answer, each proved first in the same transaction; restore: write them back.

**The proof.** A group's rows are deleted only if Synapse's answer from its
rows equals the group's snapshot. Synapse's answer is its own read: the
group's rows, then its predecessor's, one ``state_group_edges`` hop at a time,
until full rows, except that the walk stops at a group reclaimed earlier and
takes that group's state from its snapshot, which was proved equal to
Synapse's answer when it was reclaimed (so, by induction, the answer is the
one Synapse would give had nothing been deleted). Groups are reclaimed oldest
first, so the walk is one hop. A difference keeps the rows, and is counted.

Most groups are proved by their delta instead (:class:`DeltaProofs`): where the
predecessor's state is its snapshot's (it is reclaimed, or was proved earlier
in the batch) and the group's snapshot is the predecessor's plus blocks, the
two states are equal exactly when the group's own rows and what those blocks
set are equal. That reads the rows and the blocks of one change, not two whole
states: what it costs does not grow with the room. Any other group (the first
of a room, a compaction, a predecessor refused or without a snapshot, blocks
that remove a key, rows and blocks that differ) is proved from the two whole
states as above, so a difference is still found where it is. A group without
a predecessor (the first of a room, Synapse's full copy every 100 hops) is
Synapse's rows alone, compared with its snapshot in NIDs.

**The marker.** In the transaction that reclaims the first group, Synapse's
``schema_compat_version`` is set to :data:`RECLAIMED_COMPAT_VERSION`, which no
Synapse accepts (it refuses a database "too new" for it), the original kept in
``nidstate_meta``; the restore of the last group puts it back. Only the module
(``runtime.failsafe``) reads past it. So there is never a reclaimed group that
Synapse without the module could read.

**Restore** writes a group's rows in Synapse's layout from the group's state
and its predecessor's (a delta along the edge Synapse stored, full rows where
it has none: the edges are never touched, so its full copies every 100 hops
are where Synapse put them); newest first, so the predecessor is still a
reclaimed group and its state one snapshot read. Where the group's snapshot
extends its predecessor's, the rows are what its added blocks set (the change
the mirror built from Synapse's own delta), read without whole states.
"""

from collections.abc import Collection

import attr
from synapse.storage.database import LoggingDatabaseConnection, LoggingTransaction
from synapse.storage.engines import PostgresEngine
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter

from synapse_nidstate.storage.common import CorruptState, in_list_clause
from synapse_nidstate.storage.proofs import ProofStore

#: What ``schema_compat_version`` holds while any group is reclaimed: above any
#: ``SCHEMA_VERSION`` a Synapse release will have, within a 32-bit INTEGER.
RECLAIMED_COMPAT_VERSION = 2_000_000_000
#: The ``nidstate_meta`` key of the compat version Synapse had before.
SAVED_COMPAT_KEY = "reclaim_compat_version"


def reclaimed_totals_txn(
    txn: LoggingTransaction, room_id: str | None = None
) -> tuple[int, int]:
    """(groups reclaimed, rows deleted) in the database, or in ``room_id``."""
    if room_id is None:
        txn.execute(
            "SELECT COUNT(*), COALESCE(SUM(rows_deleted), 0) FROM nidstate_reclaimed_groups"
        )
    else:
        txn.execute(
            "SELECT COUNT(*), COALESCE(SUM(r.rows_deleted), 0)"
            " FROM nidstate_reclaimed_groups AS r"
            " JOIN nidstate_rooms AS rm ON rm.room_nid = r.room_nid WHERE rm.room_id = ?",
            (room_id,),
        )
    groups, rows = txn.fetchone()  # type: ignore[misc]
    return int(groups), int(rows)


def reclaimed_group_count(conn: LoggingDatabaseConnection) -> int:
    """How many groups are reclaimed, on a connection of its own (start-up)."""
    count, _ = reclaimed_totals_txn(conn.cursor(txn_name="nidstate_reclaimed_count"))
    conn.rollback()
    return count


def saved_compat_version_txn(txn: LoggingTransaction) -> int | None:
    """The compat version Synapse had before the marker (None: it had none)."""
    txn.execute("SELECT value FROM nidstate_meta WHERE key = ?", (SAVED_COMPAT_KEY,))
    row = txn.fetchone()
    return int(row[0]) if row is not None and row[0] else None


def set_marker_txn(txn: LoggingTransaction) -> None:
    """Synapse's ``schema_compat_version`` to :data:`RECLAIMED_COMPAT_VERSION`,
    keeping the value it holds now as the one to put back (idempotent)."""
    txn.execute("SELECT compat_version FROM schema_compat_version")
    row = txn.fetchone()
    if row is not None and row[0] == RECLAIMED_COMPAT_VERSION:
        return
    current = "" if row is None or row[0] is None else str(row[0])
    txn.execute("DELETE FROM nidstate_meta WHERE key = ?", (SAVED_COMPAT_KEY,))
    txn.execute(
        "INSERT INTO nidstate_meta (key, value) VALUES (?, ?)", (SAVED_COMPAT_KEY, current)
    )
    txn.execute("DELETE FROM schema_compat_version")
    txn.execute(
        "INSERT INTO schema_compat_version (compat_version) VALUES (?)",
        (RECLAIMED_COMPAT_VERSION,),
    )


class ReclaimError(Exception):
    """A group's rows cannot be written back as Synapse's layout needs them."""


@attr.s(slots=True, auto_attribs=True)
class ReclaimOutcome:
    """What one batch of reclaim or restore did."""

    groups: int = 0
    rows: int = 0
    #: Groups whose rows stay: Synapse's answer differs from the snapshot, or
    #: the walk found no end (reclaim only).
    refused: list[int] = attr.Factory(list)
    #: Groups whose rows were already back (a purge de-deltaed them; restore only).
    already_present: int = 0
    #: Of ``groups``, those proved (reclaim) or written (restore) from their
    #: delta alone (``DeltaProofs``); the others from two whole states.
    by_delta: int = 0
    #: Of ``groups`` (reclaim), those without a predecessor proved from their
    #: rows and their snapshot in NIDs (``DeltaProofs.whole_in_nids``).
    in_nids: int = 0


class ReclaimStore(ProofStore):
    # -- which groups ------------------------------------------------------

    def reclaim_marked_txn(self, txn: LoggingTransaction) -> bool:
        """Whether Synapse's ``schema_compat_version`` holds the marker. It is
        set in the transaction that reclaims the first group and put back in
        the one that restores the last, so unmarked means no group is reclaimed,
        known from Synapse's own table: what a fallback checks when the
        module's tables are the thing that failed."""
        txn.execute("SELECT compat_version FROM schema_compat_version")
        return any(row[0] == RECLAIMED_COMPAT_VERSION for row in txn.fetchall())

    def reclaimed_anchors_txn(
        self, txn: LoggingTransaction, groups: Collection[int], strict: bool = True
    ) -> dict[int, int]:
        """Of ``groups``, the reclaimed ones, each with its snapshot NID. A
        reclaimed group without a snapshot is :class:`CorruptState` (its state
        is nowhere, and Synapse's walk would read its missing rows as none);
        ``strict=False`` (restore, which clears marks Synapse's purges left)
        leaves it out instead."""
        if not groups:
            return {}
        clause, args = in_list_clause(self.engine, "r.state_group", list(groups))
        txn.execute(
            "SELECT r.state_group, g.snapshot_nid FROM nidstate_reclaimed_groups AS r"
            " LEFT JOIN nidstate_state_groups AS g ON g.state_group = r.state_group"
            f" WHERE {clause}",
            args,
        )
        found = dict(txn.fetchall())
        lost = sorted(group for group, snapshot_nid in found.items() if snapshot_nid is None)
        if lost and strict:
            raise CorruptState(f"reclaimed state groups without a snapshot: {lost[:10]}")
        return {group: nid for group, nid in found.items() if nid is not None}

    def reclaim_candidates_txn(
        self, txn: LoggingTransaction, room_id: str, after: int, limit: int
    ) -> list[int]:
        """The room's groups with a snapshot and not reclaimed, above ``after``,
        oldest first. A room Synapse holds in partial state has none: its groups
        are still being completed from other servers."""
        txn.execute(
            "SELECT g.state_group FROM nidstate_state_groups AS g"
            " JOIN state_groups AS sg ON sg.id = g.state_group"
            " WHERE sg.room_id = ? AND g.state_group > ?"
            " AND NOT EXISTS (SELECT 1 FROM nidstate_reclaimed_groups AS r"
            "  WHERE r.state_group = g.state_group)"
            " AND NOT EXISTS (SELECT 1 FROM partial_state_rooms AS p WHERE p.room_id = ?)"
            " ORDER BY g.state_group LIMIT ?",
            (room_id, after, room_id, limit),
        )
        return [row[0] for row in txn.fetchall()]

    def reclaimed_in_room_txn(
        self, txn: LoggingTransaction, room_id: str, limit: int
    ) -> list[int]:
        """The room's reclaimed groups, newest first."""
        txn.execute(
            "SELECT r.state_group FROM nidstate_reclaimed_groups AS r"
            " JOIN nidstate_rooms AS rm ON rm.room_nid = r.room_nid"
            " WHERE rm.room_id = ? ORDER BY r.state_group DESC LIMIT ?",
            (room_id, limit),
        )
        return [row[0] for row in txn.fetchall()]

    def reclaimed_rooms_txn(self, txn: LoggingTransaction) -> list[str]:
        txn.execute(
            "SELECT DISTINCT rm.room_id FROM nidstate_reclaimed_groups AS r"
            " JOIN nidstate_rooms AS rm ON rm.room_nid = r.room_nid ORDER BY rm.room_id"
        )
        return [row[0] for row in txn.fetchall()]

    def reclaimed_totals_txn(
        self, txn: LoggingTransaction, room_id: str | None = None
    ) -> tuple[int, int]:
        return reclaimed_totals_txn(txn, room_id)

    # -- Synapse's answer ----------------------------------------------------

    def synapse_states_txn(
        self, txn: LoggingTransaction, groups: Collection[int], state_filter: StateFilter
    ) -> dict[int, MutableStateMap[str]]:
        """Synapse's answer for each group from its rows, reclaimed groups on the
        way read from their (proved) snapshots; groups whose walk finds no end
        are left out. Equals ``_get_state_groups_from_groups_txn`` while no group
        is reclaimed."""
        reclaimed = self.reclaimed_anchors_txn(txn, groups)
        chains = self.chains_txn(
            txn,
            [g for g in groups if g not in reclaimed],
            self.reclaimed_anchors_txn,
            ended=True,
            anchor_table="nidstate_reclaimed_groups",
        )
        return self.states_of_txn(txn, reclaimed, chains, state_filter)

    # -- reclaim -------------------------------------------------------------

    def reclaim_groups_txn(
        self, txn: LoggingTransaction, room_id: str, groups: list[int]
    ) -> ReclaimOutcome:
        """Prove and reclaim ``groups`` of the room, oldest first; groups without a
        snapshot (or purged meanwhile), already reclaimed, or of a room in
        partial state are left as they are."""
        outcome = ReclaimOutcome()
        room_nid = self._room_nid_txn(txn, room_id)
        if room_nid is None or not groups:
            return outcome
        self._lock_room_txn(txn, room_nid)
        txn.execute("SELECT 1 FROM partial_state_rooms WHERE room_id = ?", (room_id,))
        if txn.fetchone() is not None:
            return outcome
        already = self.reclaimed_anchors_txn(txn, groups)
        snapshots = self.known_groups_txn(txn, [g for g in groups if g not in already])
        deltas = self.delta_proofs_txn(txn, snapshots, self.reclaimed_anchors_txn)
        everything = StateFilter.all()
        # Marks of groups whose rows are deleted, written before any whole proof
        # (Synapse's walk must find them where the rows are gone) and at the end.
        marks: list[tuple[int, int, int]] = []

        def write_marks() -> None:
            self.db_pool.simple_insert_many_txn(
                txn,
                table="nidstate_reclaimed_groups",
                keys=("state_group", "room_nid", "rows_deleted"),
                values=marks,
            )
            marks.clear()

        for group in sorted(snapshots):
            if group in deltas.whole_in_nids:
                outcome.in_nids += 1
            elif deltas.proves(group):
                outcome.by_delta += 1
            else:
                write_marks()
                try:
                    theirs = self.synapse_states_txn(txn, [group], everything).get(group)
                    ours = self.states_of_txn(txn, {group: snapshots[group]}, {}, everything)[group]
                except CorruptState:
                    # Its snapshot (or a reclaimed predecessor's) cannot be read:
                    # nothing is proved, the rows stay (read before any write, so
                    # the transaction is intact).
                    theirs, ours = None, {}
                if theirs is None or theirs != ours:
                    outcome.refused.append(group)
                    continue
            deltas.proved[group] = snapshots[group]
            txn.execute("DELETE FROM state_groups_state WHERE state_group = ?", (group,))
            deleted = txn.rowcount
            marks.append((group, room_nid, deleted))
            outcome.groups += 1
            outcome.rows += deleted
        write_marks()
        if outcome.groups:  # in the transaction that deletes: both commit, or neither
            self._mark_reclaimed_txn(txn)
        return outcome

    def _mark_reclaimed_txn(self, txn: LoggingTransaction) -> None:
        """Synapse's compat version to the marker, the original kept (idempotent)."""
        set_marker_txn(txn)

    # -- restore -------------------------------------------------------------

    def analyze_restored_txn(self, txn: LoggingTransaction) -> None:
        """Fresh planner statistics for the tables a restore wrote back.

        A restore can write millions of rows into tables whose statistics were
        taken when they were nearly empty (after reclaim and ``VACUUM FULL``);
        until autovacuum comes round (never, where it is off) PostgreSQL plans
        Synapse's reads and the next reclaim on them. SQLite keeps no
        statistics unless ``ANALYZE`` ran once, and Synapse never runs it there.
        """
        if isinstance(self.engine, PostgresEngine):
            txn.execute("ANALYZE state_groups_state")
            txn.execute("ANALYZE state_group_edges")

    def restore_groups_txn(self, txn: LoggingTransaction, groups: list[int]) -> ReclaimOutcome:
        """Write back the rows of reclaimed ``groups``, newest first; when none is
        left reclaimed, give Synapse its compat version back."""
        outcome = ReclaimOutcome()
        everything = StateFilter.all()
        prevs = self.prev_groups_txn(txn, groups)
        # Newest first: a predecessor is still reclaimed (its state its snapshot's)
        # when its successor is written back, so the successor's rows are what
        # its snapshot's blocks after the predecessor's set, where they extend it.
        anchors = self.reclaimed_anchors_txn(txn, {*groups, *prevs.values()}, strict=False)
        present = self.group_rows_txn(txn, groups)
        clause, args = in_list_clause(self.engine, "state_group", groups)
        txn.execute(
            f"SELECT state_group, rows_deleted FROM nidstate_reclaimed_groups WHERE {clause}",
            args,
        )
        deleted = dict(txn.fetchall())
        clause, args = in_list_clause(self.engine, "id", groups)
        txn.execute(f"SELECT id, room_id FROM state_groups WHERE {clause}", args)
        rooms = dict(txn.fetchall())
        try:
            changes = self._changes_after_txn(
                txn,
                {g: anchors[g] for g in prevs if g in anchors},
                {g: anchors.get(p) for g, p in prevs.items() if g in anchors},
            )
        except CorruptState:
            changes = {}
        for group in sorted(groups, reverse=True):
            if group not in anchors:
                # A mark without a snapshot: Synapse deleted the group (the purge
                # forgets both in one transaction, so this is a mark left over).
                if group in rooms:
                    raise ReclaimError(
                        f"state group {group} is reclaimed but the NID tables have no "
                        "snapshot for it"
                    )
                outcome.groups += 1
                continue
            if present[group]:
                outcome.already_present += 1
            else:
                added = changes.get(group)
                # What the blocks set is the group's rows, as a rule (the mirror
                # builds them from Synapse's delta); never more rows than it had.
                if added is not None and len(added) <= deleted.get(group, 0):
                    rows: StateMap[str] = added  # type: ignore[assignment]  # no None: no tombstone
                    outcome.by_delta += 1
                else:
                    rows = self._rows_to_write_txn(txn, group, prevs.get(group), everything)
                self.db_pool.simple_insert_many_txn(
                    txn,
                    table="state_groups_state",
                    keys=("state_group", "room_id", "type", "state_key", "event_id"),
                    values=[(group, rooms[group], t, k, e) for (t, k), e in rows.items()],
                )
                outcome.rows += len(rows)
            outcome.groups += 1
        # The marks last: a group's fallback above reads its own and its
        # predecessor's (older, not yet written back), never a newer group's.
        clause, args = in_list_clause(self.engine, "state_group", groups)
        txn.execute(f"DELETE FROM nidstate_reclaimed_groups WHERE {clause}", args)
        self._unmark_if_none_left_txn(txn)
        return outcome

    def _rows_to_write_txn(
        self, txn: LoggingTransaction, group: int, prev: int | None, everything: StateFilter
    ) -> StateMap[str]:
        wanted = [group] if prev is None else [group, prev]
        states = self.synapse_states_txn(txn, wanted, everything)
        if group not in states or (prev is not None and prev not in states):
            raise ReclaimError(f"state group {group}: its state or its predecessor's is unknown")
        new = states[group]
        if prev is None:
            return new
        old = states[prev]
        if not old.keys() <= new.keys():
            raise ReclaimError(
                f"state group {group} drops keys of its predecessor {prev}: "
                "no delta can express it"
            )
        return {k: v for k, v in new.items() if old.get(k) != v}

    def _unmark_if_none_left_txn(self, txn: LoggingTransaction) -> None:
        if self.any_reclaimed_txn(txn):
            return
        txn.execute("SELECT value FROM nidstate_meta WHERE key = ?", (SAVED_COMPAT_KEY,))
        row = txn.fetchone()
        if row is None:
            return
        txn.execute("DELETE FROM schema_compat_version")
        if row[0] != "":
            txn.execute(
                "INSERT INTO schema_compat_version (compat_version) VALUES (?)", (int(row[0]),)
            )
        txn.execute("DELETE FROM nidstate_meta WHERE key = ?", (SAVED_COMPAT_KEY,))

    def forget_reclaimed_txn(self, txn: LoggingTransaction, groups: Collection[int]) -> None:
        """Synapse deleted these groups (with whatever rows they had left)."""
        if groups:
            clause, args = in_list_clause(self.engine, "state_group", list(groups))
            txn.execute(f"DELETE FROM nidstate_reclaimed_groups WHERE {clause}", args)
        self._unmark_if_none_left_txn(txn)
