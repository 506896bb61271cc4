"""The resolved-state cache: a snapshot's whole state as strings.

A whole state is kept once per base (:class:`ResolvedState`); a snapshot whose
block list extends a resolved one (every snapshot between two compactions of
its room, ``algebra.extend``) is read from its extra blocks alone and kept as
its changes against that base (:class:`ResolvedChanges`); one read whole is
kept so against a base it shares its first blocks with, if they are few.
"""

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, cast

import attr
from synapse.api.constants import EventTypes
from synapse.storage.database import LoggingTransaction
from synapse.types import MutableStateMap
from synapse.types.state import StateFilter
from synapse.util.caches.lrucache import LruCache

from synapse_nidstate import algebra
from synapse_nidstate.algebra import NidStateMap
from synapse_nidstate.storage.base import TxnLearnt
from synapse_nidstate.storage.block_strings import NidStrings, last_entries
from synapse_nidstate.storage.block_strings import in_strings as resolve_in_strings
from synapse_nidstate.storage.blocks import BlockStore
from synapse_nidstate.storage.strings import StringStore, converted

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_nidstate.runtime.config import NidStateConfig


class ResolvedState:
    """A snapshot's whole state as strings, with an index by type of its
    other state than members, for filtering.

    Immutable once built (callers get copies), so it can be cached for good.
    Members are not indexed: a filter names the members it wants (a
    member's key is looked up in ``full``) or wants them all (``full`` is
    copied and what is not wanted removed), and in a big room they are
    almost the whole state, which an index would hold a second time (a
    second table of 50,000 entries, 2.6 MB, at HQ scale).
    """

    __slots__ = ("full", "_others")

    def __init__(self, full: dict[tuple[str, str], str]) -> None:
        self.full = full
        self._others: dict[str, dict[tuple[str, str], str]] | None = None

    def __len__(self) -> int:
        return len(self.full)

    @property
    def others(self) -> dict[str, dict[tuple[str, str], str]]:
        """The entries of every type but members, by type; built by the
        first filter that is not full (a full-state read never needs it, and
        a cold one pays for every step)."""
        if self._others is None:
            others: dict[str, dict[tuple[str, str], str]] = {}
            for key, event_id in self.full.items():
                if key[0] != EventTypes.Member:
                    others.setdefault(key[0], {})[key] = event_id
            self._others = others
        return self._others

    def filter(self, state_filter: StateFilter) -> MutableStateMap[str]:
        """``state_filter.filter_state(self.full)``, touching only the types
        it names (and, where it wants every member, the whole state)."""
        if state_filter.is_full():
            return dict(self.full)
        types = state_filter.types
        if EventTypes.Member in types:
            member_keys = types[EventTypes.Member]
            all_members = member_keys is None
        else:
            member_keys = frozenset()
            all_members = state_filter.include_others
        others = self.others
        out: MutableStateMap[str]
        if all_members:
            # Almost the whole state: copied, then the other types' keys it
            # does not want taken out.
            out = dict(self.full)
            for event_type, entries in others.items():
                wanted = types.get(event_type) if event_type in types else (
                    None if state_filter.include_others else frozenset()
                )
                if wanted is not None:
                    for key in entries:
                        if key[1] not in wanted:
                            del out[key]
            return out
        out = {}
        assert member_keys is not None
        for state_key in member_keys:
            event_id = self.full.get((EventTypes.Member, state_key))
            if event_id is not None:
                out[(EventTypes.Member, state_key)] = event_id
        for event_type, state_keys in types.items():
            of_type = others.get(event_type)
            if not of_type:
                continue
            if state_keys is None:
                out.update(of_type)
            else:
                for state_key in state_keys:
                    event_id = of_type.get((event_type, state_key))
                    if event_id is not None:
                        out[(event_type, state_key)] = event_id
        if state_filter.include_others:
            for event_type, of_type in others.items():
                if event_type not in types:
                    out.update(of_type)
        return out


class ResolvedChanges:
    """A snapshot's whole state as what it changes in an ancestor's
    :class:`ResolvedState` (its ``base``, cached under that snapshot's NID):
    a key mapped to None is not in the state.

    A snapshot extends its parent by one block until the room's next
    compaction (``algebra.extend``), so the snapshots of a busy room between
    two compactions share one base and each keeps only its changes: the
    cache holds one whole state per compaction instead of one per snapshot.
    """

    __slots__ = ("base", "changes")

    def __init__(self, base: int, changes: dict[tuple[str, str], str | None]) -> None:
        self.base = base
        self.changes = changes

    def __len__(self) -> int:
        return len(self.changes) + 1

    def filter(self, base: ResolvedState, state_filter: StateFilter) -> MutableStateMap[str]:
        """``state_filter.filter_state`` of the state (``base`` the resolved base)."""
        out = base.filter(state_filter)
        full = state_filter.is_full()
        types = state_filter.types
        for key, event_id in self.changes.items():
            if not full:
                if key[0] in types:
                    state_keys = types[key[0]]
                    if state_keys is not None and key[1] not in state_keys:
                        continue
                elif not state_filter.include_others:
                    continue
            if event_id is None:
                out.pop(key, None)
            else:
                out[key] = event_id
        return out


#: A snapshot's changes are kept against a base while they are at most this
#: part of the base's entries (or :data:`MIN_CHANGES`); beyond, the snapshot
#: is resolved whole and becomes a base itself.
CHANGES_PART = 4
MIN_CHANGES = 8
#: How many blocks back (from its end) a snapshot's block list is searched for
#: a resolved ancestor: every prefix. Snapshots extend their parent one block
#: at a time, but one that merged its last blocks at the limit
#: (``algebra.merge_point``) keeps the blocks of its room's last compaction as
#: a prefix up to 48 blocks back, and that compaction's snapshot is the base
#: worth finding (a search 8 blocks back made the mix at M 12-15% slower).
ANCESTOR_BLOCKS = algebra.MAX_BLOCKS


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _Ancestor:
    """A resolved snapshot whose block list a snapshot's extends by ``extra``."""

    snapshot_nid: int
    extra: tuple[int, ...]
    #: Its cache entry and that entry's base; None if it is earlier in this read.
    cached: "ResolvedState | ResolvedChanges | None"
    cached_base: ResolvedState | None


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _Plan:
    """How one read builds a snapshot's whole state (``_resolve_whole``).

    ``whole``: a base, ``nids`` its whole state. Otherwise the state is
    ``base``'s (``cached_base`` if cached, else a base of this read) with
    ``inherited`` (strings) and then ``nids`` applied; kept so, or with
    ``rebase`` made a base of its own. ``size``: the base's entries.
    """

    base: int | None
    cached_base: ResolvedState | None
    inherited: dict[tuple[str, str], str | None]
    nids: NidStateMap
    size: int
    whole: bool = False
    rebase: bool = False


class ResolvedStateStore(BlockStore, StringStore):
    #: A read that builds whole states of at least this many entries in all
    #: (a big room's) calls ``after_big_read`` once its transaction ends: the
    #: memory it decoded them in is freed by then (runtime/freed_memory.py).
    BIG_READ_ENTRIES = 10_000

    def __init__(self, hs: "HomeServer", config: "NidStateConfig") -> None:
        super().__init__(hs, config)
        self.after_big_read: Callable[[], None] | None = None
        # snapshot -> its whole state as strings (immutable), or its changes
        # against an ancestor's, sized in entries.
        self._resolved: LruCache[int, ResolvedState | ResolvedChanges] = self._cache(
            "resolved_state", config.resolved_state_cache_size, size_callback=len
        )
        #: The block list of each snapshot in ``_resolved`` (kept in step by the
        #: cache's callbacks): how a snapshot finds a resolved ancestor.
        self._resolved_index: dict[tuple[int, ...], int] = {}
        #: The bases in ``_resolved`` by first block, with their block lists.
        self._bases_by_first_block: dict[int, dict[int, tuple[int, ...]]] = {}

    def clear_caches(self) -> None:
        super().clear_caches()
        self._resolved_index.clear()
        self._bases_by_first_block.clear()

    def _cached_resolved(
        self, snapshot_nid: int
    ) -> Callable[[StateFilter], MutableStateMap[str]] | None:
        """The snapshot's whole state from the resolved-state cache, as a
        filtering function; None if it (or its base) is not cached."""
        if snapshot_nid not in self._resolved.cache:
            # Narrow lookups miss here for every snapshot of a warm batch:
            # the cache's own dict answers a miss without LruCache.get's cost.
            return None
        entry = self._resolved.get(snapshot_nid)
        if entry is None or isinstance(entry, ResolvedState):
            return None if entry is None else entry.filter
        base = self._resolved.get(entry.base)
        if not isinstance(base, ResolvedState):
            return None  # the base was evicted: read again
        return functools.partial(entry.filter, base)

    def _resolve_whole(
        self,
        txn: LoggingTransaction | None,
        learnt: TxnLearnt,
        block_lists: Mapping[int, tuple[int, ...]],
        state_filter: StateFilter,
    ) -> dict[int, MutableStateMap[str]]:
        """Whole states of snapshots, filtered, and into the resolved-state cache.

        Shortest block lists first: a snapshot whose block list extends one
        already resolved (cached, or earlier in this read) is resolved from
        the changes of its extra blocks alone (only those blocks, and the
        strings of their entries, are read) and kept as changes against that
        one's base (:class:`ResolvedChanges`) while they stay small beside it;
        otherwise it becomes a base itself, built from its ancestor's state
        and the changes where it has an ancestor, from all its blocks where not.
        """
        order = sorted(block_lists, key=lambda s: len(block_lists[s]))
        ancestors: dict[int, _Ancestor] = {}
        in_read: dict[tuple[int, ...], int] = {}
        needed: set[int] = set()
        for snapshot_nid in order:
            block_nids = block_lists[snapshot_nid]
            ancestor = self._ancestor(block_nids, in_read)
            if ancestor is None:
                needed.update(block_nids)
            else:
                ancestors[snapshot_nid] = ancestor
                needed.update(ancestor.extra)
            in_read[block_nids] = snapshot_nid
        # The strings stored beside the blocks (schema 7) come with them.
        known = NidStrings()
        blocks = self._blocks_txn(txn, learnt, needed, strings=known)
        if txn is not None:
            txn.call_after(self._publish, learnt)

        # A whole state that no other snapshot of this read builds on, with
        # blocks that carry their strings, is resolved in strings: its big
        # blocks' strings as stored, its small ones' by NID.
        parents = {a.snapshot_nid for a in ancestors.values() if a.cached is None}
        in_strings = {
            s
            for s in order
            if s not in ancestors
            and s not in parents
            and any(b in known for b in block_lists[s])
        }
        plans: dict[int, _Plan] = {}
        for snapshot_nid in order:
            ancestor = ancestors.get(snapshot_nid)
            if snapshot_nid in in_strings:
                plans[snapshot_nid] = _Plan(None, None, {}, {}, 0, whole=True)
                continue
            if ancestor is None:
                full = algebra.resolve(blocks[b] for b in block_lists[snapshot_nid])
                plans[snapshot_nid] = _Plan(None, None, {}, full, len(full), whole=True)
                continue
            own = algebra.changes(blocks[b] for b in ancestor.extra)
            if ancestor.cached is None:
                parent = plans[ancestor.snapshot_nid]
                if parent.whole or parent.rebase:  # a base of this read
                    plan = _Plan(ancestor.snapshot_nid, None, {}, own, parent.size)
                else:
                    plan = _Plan(
                        parent.base,
                        parent.cached_base,
                        parent.inherited,
                        {**parent.nids, **own},
                        parent.size,
                    )
            elif isinstance(ancestor.cached, ResolvedState):
                plan = _Plan(
                    ancestor.snapshot_nid, ancestor.cached, {}, own, len(ancestor.cached)
                )
            else:
                assert ancestor.cached_base is not None
                plan = _Plan(
                    ancestor.cached.base,
                    ancestor.cached_base,
                    ancestor.cached.changes,
                    own,
                    len(ancestor.cached_base),
                )
            if len(plan.inherited) + len(plan.nids) > max(
                MIN_CHANGES, plan.size // CHANGES_PART
            ):
                # Too many changes: a base of its own, from its base and them.
                base_plan = (
                    plans[plan.base]
                    if plan.base is not None and plan.cached_base is None
                    else None
                )
                if base_plan is not None and base_plan.whole and not plan.inherited:
                    full = dict(base_plan.nids)
                    for key, event_nid in plan.nids.items():
                        if event_nid:
                            full[key] = event_nid
                        else:
                            full.pop(key, None)
                    plan = _Plan(None, None, {}, full, len(full), whole=True)
                else:
                    plan = attr.evolve(plan, rebase=True)
            plans[snapshot_nid] = plan

        # A whole state is cached as strings (below): filling the per-NID
        # caches with thousands of entries as well would cost more than the read.
        # Of the blocks without strings, the entries no later one of them overwrites.
        by_nid_entries = {
            s: last_entries(block_lists[s], blocks, known) for s in in_strings
        }
        small = [entries for s in in_strings for entries in by_nid_entries[s].values()]
        nid_states = [p.nids for p in plans.values()]
        by_nid = self._strings_of_nids_read(
            txn,
            {t for m in nid_states for t, _ in m} | {t for b in small for t, _, _ in b},
            {k for m in nid_states for _, k in m} | {k for b in small for _, k, _ in b},
            {e for m in nid_states for e in m.values() if e} | {e for b in small for *_, e in b if e},
            fill=False,
            # The big blocks' strings by NID only where NIDs are turned into strings.
            known=known.maps() if any(nid_states) else None,
        )
        strings = {s: converted(by_nid, p.nids) for s, p in plans.items() if s not in in_strings}
        for snapshot_nid in in_strings:
            strings[snapshot_nid] = resolve_in_strings(
                block_lists[snapshot_nid], by_nid_entries[snapshot_nid], known, by_nid
            )
        bases: dict[int, ResolvedState] = {}
        built = 0  # entries of the whole states built
        answer: dict[int, MutableStateMap[str]] = {}
        for snapshot_nid in order:  # a base before what builds on it
            plan = plans[snapshot_nid]
            own_strings = strings[snapshot_nid]
            resolved: ResolvedState | ResolvedChanges
            related = whole = None
            if plan.whole:
                whole = cast("dict[tuple[str, str], str]", own_strings)
                built += len(whole)
                if snapshot_nid not in parents:  # kept as changes, if few
                    related = self._related(block_lists[snapshot_nid], whole, bases, block_lists)
            if related is not None:
                resolved = related[0]
                answer[snapshot_nid] = resolved.filter(related[1], state_filter)
            elif whole is not None:
                resolved = bases[snapshot_nid] = ResolvedState(whole)
                answer[snapshot_nid] = resolved.filter(state_filter)
            else:
                assert plan.base is not None
                base = plan.cached_base or bases[plan.base]
                changes = {**plan.inherited, **own_strings}
                if plan.rebase:
                    state = dict(base.full)
                    for string_key, event_id in changes.items():
                        if event_id is None:
                            state.pop(string_key, None)
                        else:
                            state[string_key] = event_id
                    resolved = bases[snapshot_nid] = ResolvedState(state)
                    built += len(state)
                    answer[snapshot_nid] = resolved.filter(state_filter)
                else:
                    resolved = ResolvedChanges(plan.base, changes)
                    answer[snapshot_nid] = resolved.filter(base, state_filter)
            remember = functools.partial(
                self._remember_resolved, snapshot_nid, block_lists[snapshot_nid], resolved
            )
            if txn is None:  # built from the caches: committed data only
                remember()
            else:
                txn.call_after(remember)
        if self.after_big_read is not None and built >= self.BIG_READ_ENTRIES:
            if txn is None:
                self.after_big_read()
            else:
                txn.call_after(self.after_big_read)
        return answer

    def _ancestor(
        self, block_nids: tuple[int, ...], in_read: Mapping[tuple[int, ...], int]
    ) -> "_Ancestor | None":
        """The nearest resolved snapshot (earlier in this read, or cached with
        its base) whose block list ``block_nids`` extends."""
        for cut in range(len(block_nids) - 1, max(0, len(block_nids) - 1 - ANCESTOR_BLOCKS), -1):
            prefix = block_nids[:cut]
            extra = block_nids[cut:]
            parent = in_read.get(prefix)
            if parent is not None:
                return _Ancestor(parent, extra, None, None)
            parent = self._resolved_index.get(prefix)
            if parent is None:
                continue
            # Held here: the reactor may evict them from the cache meanwhile.
            entry = self._resolved.get(parent)
            if isinstance(entry, ResolvedState):
                return _Ancestor(parent, extra, entry, entry)
            if isinstance(entry, ResolvedChanges):
                base = self._resolved.get(entry.base)
                if isinstance(base, ResolvedState):
                    return _Ancestor(parent, extra, entry, base)
        return None

    def _remember_resolved(
        self,
        snapshot_nid: int,
        block_nids: tuple[int, ...],
        resolved: "ResolvedState | ResolvedChanges",
    ) -> None:
        """Cache a resolved state, findable by its block list (for the
        snapshots that extend it) while it is cached."""
        self._resolved.set(
            snapshot_nid,
            resolved,
            callbacks=(functools.partial(self._forget_resolved, snapshot_nid, block_nids),),
        )
        self._resolved_index[block_nids] = snapshot_nid
        if isinstance(resolved, ResolvedState) and block_nids:
            self._bases_by_first_block.setdefault(block_nids[0], {})[snapshot_nid] = block_nids

    def _forget_resolved(self, snapshot_nid: int, block_nids: tuple[int, ...]) -> None:
        if self._resolved_index.get(block_nids) == snapshot_nid:
            del self._resolved_index[block_nids]
        if block_nids and (same := self._bases_by_first_block.get(block_nids[0])):
            same.pop(snapshot_nid, None)
            if not same:
                del self._bases_by_first_block[block_nids[0]]

    def _related(
        self,
        block_nids: tuple[int, ...],
        state: dict[tuple[str, str], str],
        in_read: Mapping[int, ResolvedState],
        block_lists: Mapping[int, tuple[int, ...]],
    ) -> tuple[ResolvedChanges, ResolvedState] | None:
        """``state`` as changes against a base, and the base, if few enough:
        the base (cached, or of this read: ``in_read``) sharing the most
        leading blocks with ``block_nids``, the first at least, then the
        shortest. At PostgreSQL L the 20,001-member room's 167 latest groups
        were 8 whole states 2-46 entries apart: snapshots merged at the limit
        or read before those they extend have no resolved ancestor."""
        # (A list: the reactor may change the dict meanwhile; the base is held.)
        same = self._bases_by_first_block.get(block_nids[0], {}) if block_nids else {}
        candidates = list(same.items())
        candidates += [(s, block_lists[s]) for s in in_read if block_lists[s][:1] == block_nids[:1]]
        best = max(
            ((n := algebra.shared_prefix(block_nids, b), n - len(b), s) for s, b in candidates),
            default=None,
        )
        if best is None:
            return None
        base = in_read[best[2]] if best[2] in in_read else self._resolved.get(best[2])
        if not isinstance(base, ResolvedState):
            return None
        most = max(MIN_CHANGES, len(base) // CHANGES_PART)
        changes = algebra.bounded_difference(state, base.full, most)
        return None if changes is None else (ResolvedChanges(best[2], changes), base)
