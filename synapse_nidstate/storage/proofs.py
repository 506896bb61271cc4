"""Reclaim's proofs by delta: a group's state proved equal to its snapshot's
from its predecessor's proved state and its own change, at a cost that does
not grow with the room (``reclaim`` says when it applies and what it proves).
"""

import attr
from synapse.storage.database import LoggingTransaction

from synapse_nidstate import algebra
from synapse_nidstate.storage.base import TxnLearnt
from synapse_nidstate.storage.common import STATE_KEYS, TYPES, CorruptState
from synapse_nidstate.storage.groups import Anchors, GroupStateStore
from synapse_nidstate.storage.interning import EVENTS, InterningStore


@attr.s(slots=True, auto_attribs=True)
class DeltaProofs:
    """A batch's proofs by delta (``ProofStore.delta_proofs_txn``).

    Synapse's state of a group with a predecessor is its predecessor's state
    with the group's own rows set; the snapshot's is its predecessor's
    snapshot's with what the blocks it adds set. When the predecessor's state
    is its snapshot's (proved), the two are equal if the rows and what the
    blocks set are equal: a check as big as the change, not as the room. A
    group whose snapshot merged its predecessor's last blocks with its change
    is compared in NIDs on the blocks after the two lists' shared prefix; one
    cut anew (a compaction) with its predecessor's snapshot and its rows
    whole, in NIDs (no string read; an interned string and its NID are
    one-to-one). Any other group (a predecessor not proved, blocks that remove
    a key, rows and blocks that differ) is proved from the two whole states
    as strings, as before. A group with no predecessor (the first of a room, a full copy)
    is Synapse's rows alone: they are compared with its snapshot in NIDs,
    their strings' NIDs kept in the caches once the batch commits, so the next
    full copy of the room (100 groups later, most of its strings the same)
    reads few of them."""

    prevs: dict[int, int]
    #: group -> what its snapshot's added blocks set, as strings
    changes: dict[int, dict[tuple[str, str], str | None]]
    #: group -> its own rows in state_groups_state
    rows: dict[int, dict[tuple[str, str], str]]
    #: group -> snapshot NID, of every group whose state is its snapshot's
    proved: dict[int, int]
    #: groups whose snapshot's state is their predecessor's snapshot's with
    #: their rows set, compared in NIDs (those not extending it)
    equal_in_nids: set[int] = attr.Factory(set)
    #: groups without a predecessor (Synapse's answer is their rows: the first
    #: group of a room, a full copy every 100 hops) whose rows are their
    #: snapshot's state, compared in NIDs
    whole_in_nids: set[int] = attr.Factory(set)

    def proves(self, group: int) -> bool:
        if group in self.whole_in_nids:
            return True
        prev = self.prevs.get(group)
        return (
            prev is not None
            and prev in self.proved
            and (
                (group in self.changes and self.changes[group] == self.rows[group])
                or group in self.equal_in_nids
            )
        )


class ProofStore(GroupStateStore, InterningStore):
    def delta_proofs_txn(
        self, txn: LoggingTransaction, snapshots: dict[int, int], reclaimed: Anchors
    ) -> "DeltaProofs":
        """What proves each of ``snapshots``' groups (group -> snapshot NID) by
        its delta: its predecessor along ``state_group_edges``, its own rows, and
        what its snapshot's blocks after its predecessor's snapshot's set (where
        its block list extends that one and no block removes a key). A
        predecessor's state is its snapshot's once proved: reclaimed earlier
        (``reclaimed``: of some groups, those reclaimed, with their snapshots),
        or in this batch (``DeltaProofs.proved``, oldest first)."""
        groups = list(snapshots)
        prevs = self.prev_groups_txn(txn, groups)
        try:
            reclaimed_prevs = reclaimed(txn, {p for p in prevs.values() if p not in snapshots})
        except CorruptState:
            reclaimed_prevs = {}  # each group is then proved from Synapse's whole answer
        prev_snapshots = {
            group: snapshots.get(prev, reclaimed_prevs.get(prev)) for group, prev in prevs.items()
        }
        rows = self.group_rows_txn(txn, groups)
        learnt = TxnLearnt()
        try:
            changes = self._changes_after_txn(txn, snapshots, prev_snapshots, learnt)
            equal = self._equal_in_nids_txn(txn, learnt, snapshots, prev_snapshots, rows)
            whole = self._whole_in_nids_txn(
                txn, learnt, {g: nid for g, nid in snapshots.items() if g not in prevs}, rows
            )
        except CorruptState:
            # each group is then proved from Synapse's whole answer
            changes, equal, whole = {}, set(), set()
        # Block lists and blocks never change: cache what the proofs read.
        txn.call_after(self._publish, learnt)
        return DeltaProofs(prevs, changes, rows, dict(reclaimed_prevs), equal, whole)

    def _whole_in_nids_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        snapshots: dict[int, int],
        rows: dict[int, dict[tuple[str, str], str]],
    ) -> set[int]:
        """Of groups without a predecessor (``snapshots``: group -> snapshot
        NID), those whose rows are their snapshot's state, in NIDs."""
        if not snapshots:
            return set()
        lists = self._snapshots_txn(txn, learnt, set(snapshots.values()))
        nid_rows = self._nids_of_rows_txn(txn, {g: rows[g] for g in snapshots}, fill=True)
        blocks = self._blocks_txn(
            txn, learnt, {b for nid in snapshots.values() for b in lists[nid]}
        )
        return {
            group
            for group, nid in snapshots.items()
            if group in nid_rows and algebra.resolve(blocks[b] for b in lists[nid]) == nid_rows[group]
        }

    def _changes_after_txn(
        self,
        txn: LoggingTransaction,
        snapshots: dict[int, int],
        prev_snapshots: dict[int, int | None],
        learnt: TxnLearnt | None = None,
    ) -> dict[int, dict[tuple[str, str], str | None]]:
        """For each group whose snapshot's block list starts with its
        predecessor's snapshot's: what the blocks after it set, as strings;
        none where they remove a key (Synapse's rows cannot).

        Where the two lists share a prefix but the group's does not extend
        its predecessor's (at the block limit its last blocks were merged
        with its change, ``algebra.merge_point``): what the group's blocks
        after the prefix set that its predecessor's do not set alike, where
        they set every key the predecessor's do. Applied to the predecessor's
        state that gives the group's (each key either side sets ends as the
        group's blocks set it; the others are the prefix's), so it serves
        both the proof and restore's rows."""
        learnt = learnt or TxnLearnt()
        lists = self._snapshots_txn(
            txn, learnt, {*snapshots.values(), *filter(None, prev_snapshots.values())}
        )
        added: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for group, prev_snapshot in prev_snapshots.items():
            if prev_snapshot is not None:
                mine, base = lists[snapshots[group]], lists[prev_snapshot]
                k = algebra.shared_prefix(mine, base)
                if k == len(base) or k:
                    added[group] = (mine[k:], base[k:])
        blocks = self._blocks_txn(
            txn, learnt, {b for ours, theirs in added.values() for b in (*ours, *theirs)}
        )
        nid_changes = {}
        for group, (ours, theirs) in added.items():
            mine_set = algebra.changes(blocks[b] for b in ours)
            if theirs:
                theirs_set = algebra.changes(blocks[b] for b in theirs)
                if not theirs_set.keys() <= mine_set.keys():
                    continue
                mine_set = {k: e for k, e in mine_set.items() if theirs_set.get(k) != e}
            nid_changes[group] = mine_set
        return self._to_strings(
            txn, {g: c for g, c in nid_changes.items() if all(c.values())}, fill=False
        )

    def _equal_in_nids_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        snapshots: dict[int, int],
        prev_snapshots: dict[int, int | None],
        rows: dict[int, dict[tuple[str, str], str]],
    ) -> set[int]:
        """Of the groups whose snapshot does not extend their predecessor's:
        those whose snapshot's state is the predecessor's snapshot's with the
        group's own rows set, compared in NIDs.

        Where the two block lists share a prefix (the snapshot merged its
        predecessor's last blocks with its change, ``algebra.merge_point``),
        the states are the prefix's with each one's later blocks applied: equal
        if what the group's later blocks set is what its predecessor's set with
        the rows set after them (a sufficient condition: only those blocks are
        read). Otherwise, or where that differs, the two whole states."""
        lists = self._snapshots_txn(
            txn, learnt, {*snapshots.values(), *filter(None, prev_snapshots.values())}
        )
        cut = {
            group: lists[prev]
            for group, prev in prev_snapshots.items()
            if prev is not None and lists[snapshots[group]][: len(lists[prev])] != lists[prev]
        }
        if not cut:
            return set()
        nid_rows = self._nids_of_rows_txn(txn, {group: rows[group] for group in cut})
        shared = {
            group: algebra.shared_prefix(lists[snapshots[group]], base) for group, base in cut.items()
        }
        blocks = self._blocks_txn(
            txn,
            learnt,
            {
                b
                for group, base in cut.items()
                for b in (*lists[snapshots[group]][shared[group]:], *base[shared[group]:])
            },
        )
        equal = set()
        whole = []
        for group, base in cut.items():
            if group not in nid_rows:
                continue  # a string of its rows has no NID: no snapshot holds it
            k = shared[group]
            if k:
                theirs = algebra.changes(blocks[b] for b in base[k:])
                theirs.update(nid_rows[group])
                if algebra.changes(blocks[b] for b in lists[snapshots[group]][k:]) == theirs:
                    equal.add(group)
                    continue
            whole.append(group)
        if whole:
            blocks.update(
                self._blocks_txn(
                    txn,
                    learnt,
                    {b for g in whole for b in (*lists[snapshots[g]], *cut[g])} - blocks.keys(),
                )
            )
        for group in whole:
            theirs = algebra.resolve(blocks[b] for b in cut[group])
            theirs.update(nid_rows[group])
            if algebra.resolve(blocks[b] for b in lists[snapshots[group]]) == theirs:
                equal.add(group)
        return equal

    def _nids_of_rows_txn(
        self,
        txn: LoggingTransaction,
        rows: dict[int, dict[tuple[str, str], str]],
        fill: bool = False,
    ) -> dict[int, dict[tuple[int, int], int]]:
        """Each group's rows in NIDs, read only (nothing interned); a group with
        a string that has no NID is left out. ``fill``: the NIDs read go into
        the caches once the transaction commits."""
        types = self._nids_read_txn(txn, TYPES, {t for r in rows.values() for t, _ in r}, fill)
        keys = self._nids_read_txn(
            txn, STATE_KEYS, {k for r in rows.values() for _, k in r}, fill
        )
        events = self._nids_read_txn(
            txn, EVENTS, {e for r in rows.values() for e in r.values()}, fill
        )
        return {
            group: {(types[t], keys[k]): events[e] for (t, k), e in state.items()}
            for group, state in rows.items()
            if all(t in types and k in keys and e in events for (t, k), e in state.items())
        }
