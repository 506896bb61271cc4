"""Synapse's state groups answered from the snapshots: a group the mirror has
directly, any other group through its delta chain down to the nearest group
the mirror has.

Synapse stores a group as a delta over its predecessor (``state_group_edges``
plus the delta's rows in ``state_groups_state``) or, every 100 hops and where
a delta cannot express it, as full rows. A group without a snapshot (its
events are being persisted, it is partial-state, its plan failed) usually
builds on one with a snapshot, whose rows may be reclaimed; so its state is
read as Synapse would, along its edges, except that the walk (one recursive
query, whatever its length) stops at the first group with a snapshot
(``anchors``) and takes that group's state from it. While no group is
reclaimed, a chain longer than :data:`SHORT_WALK_HOPS` or one that ends in
full rows without meeting an anchor is left to Synapse's own read; while one
is, the walk goes to the chain's end (at most
:data:`MAX_WALK_HOPS`) and a chain that ends in full rows is answered from
those rows, as Synapse would.
"""

from collections import OrderedDict
from collections.abc import Callable, Collection

import attr
from synapse.storage.database import LoggingTransaction
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter

from synapse_nidstate.storage.common import CacheMiss, in_list_clause
from synapse_nidstate.storage.reads import SnapshotRead, StateReadStore

#: Synapse writes full rows at least every 100 hops (``MAX_STATE_DELTA_HOPS``);
#: a longer walk meets a full group first, unless groups were edited by hand.
MAX_WALK_HOPS = 128
#: How far a read walks while no group is reclaimed (Synapse's own read is then
#: right for every group): far enough for a group stored before its event is
#: persisted, short enough that a chain of groups the mirror has not seen yet
#: (history not migrated) costs little more than Synapse's own read.
SHORT_WALK_HOPS = 4

#: A walk's next hop along ``state_group_edges`` (a group has at most one
#: predecessor; NULL past the chain's end). As a scalar subquery it is an index
#: probe a hop, whatever the planner knows of the table; as a join PostgreSQL
#: may hash the whole table at every hop (34 ms for a 100-hop walk at M without
#: statistics, 2.1 with them, against 0.6 so; Synapse's own walk turns
#: sequential scans off for the same reason).
_NEXT_HOP = (
    "SELECT w.origin, (SELECT e.prev_state_group FROM state_group_edges AS e"
    " WHERE e.state_group = w.at), w.hops + 1 FROM walk AS w"
)

#: Which of some groups may end a walk, each with its snapshot NID.
Anchors = Callable[[LoggingTransaction, Collection[int]], dict[int, int]]


class KnownStates(OrderedDict[int, dict[tuple[str, str], str]]):
    """Whole states of groups read from Synapse's rows by one run
    (``difference_txn``'s ``known``), the oldest first out once they hold more
    than ``max_entries`` entries (the newest is kept whatever its size)."""

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def add(self, group: int, state: dict[tuple[str, str], str]) -> None:
        self[group] = state
        total = sum(map(len, self.values()))
        while len(self) > 1 and total > self.max_entries:
            total -= len(self.popitem(last=False)[1])


@attr.s(slots=True, auto_attribs=True)
class Chain:
    """A group's rows and its predecessors' rows down to an anchor."""

    #: The group whose snapshot the state starts from (None: the chain ends in
    #: full rows, the last of ``deltas``).
    anchor: int | None
    anchor_snapshot: int | None
    #: Rows of each group on the way, the walked group's first.
    deltas: list[StateMap[str]]


class GroupStateStore(StateReadStore):
    def group_rows_txn(
        self, txn: LoggingTransaction, groups: Collection[int]
    ) -> dict[int, dict[tuple[str, str], str]]:
        """Each group's own rows in ``state_groups_state`` (a delta or a full copy)."""
        rows: dict[int, dict[tuple[str, str], str]] = {g: {} for g in groups}
        for group, event_type, state_key, event_id in self._select_in_txn(
            txn,
            "SELECT state_group, type, state_key, event_id FROM state_groups_state WHERE",
            "state_group",
            list(groups),
        ):
            rows[group][(event_type, state_key)] = event_id
        return rows

    def prev_event_groups_txn(
        self, txn: LoggingTransaction, groups: list[int]
    ) -> dict[int, set[int]]:
        """The groups of the prev events of each of ``groups``' events, but
        itself (main database: events, not state)."""
        clause, args = in_list_clause(txn.database_engine, "esg.state_group", groups)
        txn.execute(
            "SELECT esg.state_group, prev.state_group FROM event_to_state_groups AS esg"
            " JOIN event_edges AS edge ON edge.event_id = esg.event_id"
            " JOIN event_to_state_groups AS prev ON prev.event_id = edge.prev_event_id"
            f" WHERE {clause} AND prev.state_group <> esg.state_group",
            args,
        )
        found: dict[int, set[int]] = {}
        for group, prev in txn:
            found.setdefault(group, set()).add(prev)
        return found

    def prev_groups_txn(
        self, txn: LoggingTransaction, groups: Collection[int]
    ) -> dict[int, int]:
        """Each group's predecessor in ``state_group_edges``, for those that have one."""
        return dict(
            self._select_in_txn(
                txn,
                "SELECT state_group, prev_state_group FROM state_group_edges WHERE",
                "state_group",
                list(groups),
            )
        )

    def difference_txn(
        self,
        txn: LoggingTransaction,
        group: int,
        base: int,
        reclaim_here: bool,
        known: KnownStates | None = None,
    ) -> dict[tuple[str, str], str] | None:
        """Synapse's state of ``group`` as a change of ``base``'s: the keys
        whose event differs (a full copy of a big room is thousands of rows,
        its difference from the group before it a few, and only those few
        need their NIDs looked up and a block). None where that change is
        not a delta: a key of ``base``'s state missing from ``group``'s, a
        chain of either longer than :data:`MAX_WALK_HOPS`, or
        (``reclaim_here``: Synapse's state tables share the module's
        database) a chain through a reclaimed group.

        ``known``: whole states of groups, read from Synapse's rows earlier by
        the caller's run (a group's state never changes): a chain stops at the
        first of them, and its rows below are not read again. Where
        ``group`` is a full copy (no predecessor) its state is added to it.
        A migration meets each full copy of a big room twice, as ``group`` and
        then as the end of the next copy's base's chain: so its rows are read
        once.

        Two statements (three where reclaim is on): both chains walked along
        ``state_group_edges``, then the rows of every group on them above a
        known one."""
        txn.execute(
            "WITH RECURSIVE walk(origin, at, hops) AS ("
            " VALUES (0, CAST(? AS BIGINT), 0), (1, CAST(? AS BIGINT), 0)"
            f" UNION ALL {_NEXT_HOP} WHERE w.at IS NOT NULL AND w.hops <= ?"
            ") SELECT origin, at, hops FROM walk WHERE at IS NOT NULL",
            (group, base, MAX_WALK_HOPS),
        )
        chains: tuple[list[int], list[int]] = ([], [])
        for origin, at, hops in sorted(txn.fetchall(), key=lambda row: row[2]):
            if hops > MAX_WALK_HOPS:
                return None
            chains[origin].append(at)
        if reclaim_here and self._select_in_txn(
            txn,
            "SELECT state_group FROM nidstate_reclaimed_groups WHERE",
            "state_group",
            chains[0] + chains[1],
        ):
            return None
        # Each chain down to its first known group (or whole).
        kept = {} if known is None else known
        cut = [next((i for i, g in enumerate(chain) if g in kept), len(chain)) for chain in chains]
        # Both states resolved as Synapse's read resolves a chain (the latest
        # group wins per key), here rather than in SQL: a full copy's rows
        # come as stored, where sorting or hashing them on the server took
        # several times Synapse's own read of the copy (docs/benchmarks.md,
        # session 23).
        rows = self.group_rows_txn(
            txn, {g for chain, k in zip(chains, cut, strict=True) for g in chain[:k]}
        )
        mine, theirs = (
            _resolve(
                [rows[g] for g in chain[:k]] + ([kept[chain[k]]] if k < len(chain) else [])
            )
            for chain, k in zip(chains, cut, strict=True)
        )
        if known is not None and len(chains[0]) == 1 and cut[0] == 1:
            known.add(group, mine)
        if any(key not in mine for key in theirs):
            return None
        return {key: event_id for key, event_id in mine.items() if theirs.get(key) != event_id}

    def chains_txn(
        self,
        txn: LoggingTransaction,
        groups: Collection[int],
        anchors: Anchors,
        ended: bool = False,
        max_hops: int = MAX_WALK_HOPS,
        anchor_table: str = "nidstate_state_groups",
    ) -> dict[int, Chain]:
        """The chain of each of ``groups`` (none of them an anchor) down to its
        nearest anchor (a group in ``anchor_table``; ``anchors`` gives the
        anchors' snapshots); a chain that ends in full rows first is left out,
        or with ``ended`` kept without an anchor; one longer than ``max_hops``
        is left out.

        Three statements whatever the chains' length: the walk along
        ``state_group_edges`` as one recursive query that stops at an anchor
        (as Synapse's own read on PostgreSQL walks them in one), the anchors'
        snapshots, and the rows of every group on the way."""
        if not groups:
            return {}
        clause, args = in_list_clause(self.engine, "state_group", list(groups))
        txn.execute(
            "WITH RECURSIVE walk(origin, at, hops) AS ("
            f" SELECT state_group, prev_state_group, 1 FROM state_group_edges WHERE {clause}"
            f" UNION ALL {_NEXT_HOP}"
            f" WHERE w.at IS NOT NULL AND w.hops < ? AND NOT EXISTS (SELECT 1 FROM {anchor_table} AS a"
            "  WHERE a.state_group = w.at)"
            ") SELECT origin, at, hops FROM walk WHERE at IS NOT NULL",
            (*args, max_hops),
        )
        # walked group -> the groups on its way after it, in order
        ways: dict[int, list[int]] = {g: [] for g in groups}
        for origin, at, _ in sorted(txn.fetchall(), key=lambda row: row[2]):
            ways[origin].append(at)
        anchored = anchors(txn, {way[-1] for way in ways.values() if way})
        chains: dict[int, tuple[int | None, list[int]]] = {}
        for group, way in ways.items():
            if way and way[-1] in anchored:
                chains[group] = (way[-1], [group, *way[:-1]])
            elif len(way) < max_hops and ended:
                # No edge from the last group: its rows are full.
                chains[group] = (None, [group, *way])
        rows = self.group_rows_txn(txn, {g for _, on_way in chains.values() for g in on_way})
        return {
            group: Chain(
                anchor,
                None if anchor is None else anchored[anchor],
                [rows[g] for g in on_way],
            )
            for group, (anchor, on_way) in chains.items()
        }

    def cached_state_for_groups(
        self, groups: Collection[int], state_filter: StateFilter
    ) -> dict[int, MutableStateMap[str]]:
        """:meth:`state_for_groups_txn` from the caches alone, for the groups
        whose snapshot and its state (as ``state_filter`` wants it) are cached;
        the others are left out (they are read in a transaction)."""
        snapshots, _ = self._split_cached(self._group_snapshots, groups)
        if not snapshots:
            return {}
        try:
            by_snapshot = self.snapshot_states_txn(None, set(snapshots.values()), state_filter)
        except CacheMiss:
            return {}
        return _per_group(snapshots, by_snapshot)

    def state_for_groups_txn(
        self,
        txn: LoggingTransaction,
        groups: Collection[int],
        state_filter: StateFilter,
        direct: set[int] | None = None,
    ) -> dict[int, MutableStateMap[str]]:
        """The state of each group the mirror can answer, filtered as
        ``StateGroupDataStore._get_state_groups_from_groups_txn`` answers: from
        its snapshot, or through its chain to the nearest group with one.

        ``direct`` gets the groups answered from their own snapshot: the
        module's caches keep their state (:meth:`cached_state_for_groups`)."""
        # One statement: each group's snapshot, its block list, and the
        # NIDs of the filter's strings.
        read = self.snapshot_read(state_filter)
        known = self.group_snapshots_read(txn, groups, read.learnt, read.filter_nids)
        if direct is not None:
            direct.update(known)
        rest = [g for g in groups if g not in known]
        if not rest:
            return self.states_of_txn(txn, known, {}, state_filter, read)
        # While a group is reclaimed, a chain may pass through it however deep:
        # walk it all, and answer a chain that ends in full rows from those rows
        # (Synapse's own answer, read once). Otherwise Synapse's read is right
        # for every group: walk a few hops, and leave longer chains to it.
        reclaimed = self.any_reclaimed_txn(txn)
        chains = self.chains_txn(
            txn,
            rest,
            self.known_groups_txn,
            ended=reclaimed,
            max_hops=MAX_WALK_HOPS if reclaimed else SHORT_WALK_HOPS,
        )
        return self.states_of_txn(txn, known, chains, state_filter, read)

    def any_reclaimed_txn(self, txn: LoggingTransaction) -> bool:
        """Whether any state group's rows are reclaimed (``storage.reclaim``)."""
        txn.execute("SELECT 1 FROM nidstate_reclaimed_groups LIMIT 1")
        return txn.fetchone() is not None

    def states_of_txn(
        self,
        txn: LoggingTransaction,
        snapshots: dict[int, int],
        chains: dict[int, Chain],
        state_filter: StateFilter,
        read: SnapshotRead | None = None,
    ) -> dict[int, MutableStateMap[str]]:
        """Each group's state: of ``snapshots`` (group -> snapshot NID) from the
        snapshot, of ``chains`` from the anchor's snapshot and the rows on the way."""
        by_snapshot = self.snapshot_states_txn(
            txn,
            set(snapshots.values())
            | {c.anchor_snapshot for c in chains.values() if c.anchor_snapshot is not None},
            state_filter,
            read,
        )
        answer = _per_group(snapshots, by_snapshot)
        for group, chain in chains.items():
            state: MutableStateMap[str] = (
                {} if chain.anchor_snapshot is None else dict(by_snapshot[chain.anchor_snapshot])
            )
            for delta in reversed(chain.deltas):
                state.update(state_filter.filter_state(delta))
            answer[group] = state
        return answer


def _resolve(chain_rows: list[dict[tuple[str, str], str]]) -> dict[tuple[str, str], str]:
    """The state of a chain from its groups' rows (the walked group's first)."""
    state = dict(chain_rows[-1])
    for rows in reversed(chain_rows[:-1]):
        state.update(rows)
    return state


def _per_group(
    snapshots: dict[int, int], by_snapshot: dict[int, MutableStateMap[str]]
) -> dict[int, MutableStateMap[str]]:
    """Each group's state from its snapshot's. The snapshots' states are new
    dicts no cache holds; each goes to one group as it is, and a second group
    of the same snapshot gets a copy (the caller may change what it gets)."""
    answer: dict[int, MutableStateMap[str]] = {}
    given: set[int] = set()
    for group, nid in snapshots.items():
        answer[group] = dict(by_snapshot[nid]) if nid in given else by_snapshot[nid]
        given.add(nid)
    return answer
