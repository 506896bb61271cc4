"""Parts of snapshots' states as strings, kept as Synapse keeps a state group's.

Synapse caches a state group's state in two ``DictionaryCache``\\ s, its
members and everything else, each holding what the reads so far fetched of it
(and which keys they found absent), so that a read of a few members (a
visibility check, lazy-loading) keeps only those. Narrow lookups of the module
keep what they resolve the same way, per snapshot (:meth:`SplitStateCache.fill`
after the read, :meth:`SplitStateCache.get` before it), by the rules of
``StateGroupDataStore._get_state_for_group_using_cache`` and
``_insert_into_cache``: what a filter reads of each cache, and what a read
tells each cache it fetched. Whole states are kept apart, once per base
(``resolved``).

Unlike ``DictionaryCache``, which holds each key of each group in a node of
its own (an ``LruCache`` node, a ``TreeCache`` entry and a wrapper, so that
keys are evicted one by one), a snapshot is one node holding what is known
of both its parts (:class:`Part`), sized, as Synapse sizes its caches, by
the keys they hold, and replaced when a read adds keys: a warm read of a
page's visibility is one lookup, and a key kept costs a dict slot
(``benchmarks.mix --trace-memory`` shows what the cache keeps after a
replay; a node is about 280 bytes, so one a part cost 0.7 MiB more after
the mix at M). A snapshot is evicted as one: snapshots never change, and
the keys a room's reads ask are few.
"""

import functools
from collections.abc import Collection
from typing import TYPE_CHECKING

import attr
from synapse.api.constants import EventTypes
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter
from synapse.util.caches.lrucache import LruCache

if TYPE_CHECKING:
    from synapse.util.clock import Clock

StateKey = tuple[str, str]

#: Filters whose split (:meth:`SplitStateCache.prepare`) is kept: a read
#: splits its filter before it and again to fill the caches after it, and
#: reads of one filter (a page's visibility) come together. Few, so that a
#: lazy-loading filter of many members is not kept long.
_SPLITS_KEPT = 64


#: What most parts know absent: nothing (one object for them all).
_NONE: frozenset[StateKey] = frozenset()


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Part:
    """What is known of one part (members, or the rest) of a snapshot's state:
    all of it (``full``), or some keys' event IDs and keys known absent
    (``DictionaryEntry``'s meaning). Never changed once cached: a read that
    learns more caches a new one."""

    full: bool
    value: dict[StateKey, str]
    known_absent: frozenset[StateKey]

    def __len__(self) -> int:
        # The keys it holds, as DictionaryCache counts them.
        return len(self.value) + len(self.known_absent)


#: What is known of a snapshot's state: its members, and the rest (None:
#: nothing yet). One cache node for both.
Parts = tuple[Part | None, Part | None]


def _size(parts: Parts) -> int:
    """A snapshot's size in the cache: the keys its parts hold (one at least)."""
    return max(1, sum(len(part) for part in parts if part is not None))


def _updated(
    known: Part | None, value: dict[StateKey, str], fetched_keys: Collection[StateKey] | None
) -> Part | None:
    """A part after a read fetched ``value`` of it (``DictionaryCache.update``):
    all of the part (``fetched_keys`` None), or ``value`` for ``fetched_keys``,
    the others of them known absent; ``known`` itself if nothing is new."""
    if fetched_keys is None:
        return Part(True, value, _NONE)
    if not fetched_keys:
        return known  # the read fetched nothing of this part
    if known is not None:
        if known.full:
            return known
        value = {**known.value, **value}
        absent = known.known_absent.union(fetched_keys)
    else:
        absent = frozenset(fetched_keys)
    absent = absent.difference(value) or _NONE
    if known is not None and len(value) == len(known.value) and absent == known.known_absent:
        return known
    return Part(False, value, absent)


class SplitStateCache:
    """The parts of snapshots' states, one node a snapshot for both (see the
    module's doc), with ``DictionaryCache``'s sequence: a fill prepared
    before an invalidation is dropped."""

    def __init__(self, clock: "Clock", server_name: str, max_entries: int) -> None:
        self.cache: LruCache[int, Parts] = LruCache(
            max_size=max_entries,
            clock=clock,
            server_name=server_name,
            cache_name="nidstate_snapshot_parts",
            size_callback=_size,
        )
        #: Taken before a read (:meth:`fill`).
        self.sequence = 0
        #: One tuple per (type, state key) for the parts of every snapshot:
        #: a room's reads ask the same few keys at many snapshots (after a
        #: replay of the mix at M, 11,789 entries held 586 keys), and each
        #: read's answer has a tuple of its own for each (56 bytes). Emptied
        #: when it holds as many keys as the cache may, so that keys no
        #: part holds any more do not pile up; the parts keep theirs.
        self._keys: dict[StateKey, StateKey] = {}

    def invalidate_all(self) -> None:
        self.sequence += 1
        self.cache.clear()

    @staticmethod
    @functools.lru_cache(maxsize=_SPLITS_KEPT)
    def prepare(state_filter: StateFilter) -> "SplitFilter":
        """What :meth:`get` and :meth:`fill` need of a filter, worked out once
        per filter (not per snapshot nor per read: a batch of events reads
        many snapshots, and filters repeat; ``get_member_split`` makes two
        new filters each time)."""
        member_filter, non_member_filter = state_filter.get_member_split()
        return SplitFilter(_PartFilter.of(member_filter), _PartFilter.of(non_member_filter))

    def get(self, snapshot_nid: int, wanted: "SplitFilter") -> MutableStateMap[str] | None:
        """The snapshot's state filtered, if the cache holds all the filter wants."""
        if wanted.nothing:
            return {}
        parts = self.cache.get(snapshot_nid)
        if parts is None:
            return None
        non_members = wanted.non_members.read(parts[1])
        if non_members is None:
            return None
        members = wanted.members.read(parts[0])
        if members is None:
            return None
        non_members.update(members)
        return non_members

    def fill(
        self,
        states: dict[int, StateMap[str]],
        state_filter: StateFilter,
        sequence: int,
    ) -> None:
        """Keep what a read of ``states`` with ``state_filter`` fetched (the
        filter's concrete keys, or all of a part it wants whole), unless the
        cache was invalidated since ``sequence``."""
        if sequence != self.sequence:
            return
        split = self.prepare(state_filter)
        member_filter, non_member_filter = (
            split.members.state_filter,
            split.non_members.state_filter,
        )
        # concrete_types() is all the filter fetched unless it has wildcards;
        # with wildcards it names fewer keys than were fetched, which only
        # makes the cache know less.
        member_keys = None if member_filter.is_full() else member_filter.concrete_types()
        non_member_keys = (
            None if non_member_filter.is_full() else non_member_filter.concrete_types()
        )
        keys = self._keys
        if len(keys) > self.cache.max_size:
            keys.clear()
        for snapshot_nid, state in states.items():
            members: dict[StateKey, str] = {}
            non_members: dict[StateKey, str] = {}
            for key, event_id in state.items():
                key = keys.setdefault(key, key)
                (members if key[0] == EventTypes.Member else non_members)[key] = event_id
            known = self.cache.get(snapshot_nid, update_metrics=False)
            old_members, old_rest = (None, None) if known is None else known
            new_members = _updated(old_members, members, member_keys)
            new_rest = _updated(old_rest, non_members, non_member_keys)
            if new_members is not old_members or new_rest is not old_rest:
                self.cache.set(snapshot_nid, (new_members, new_rest))


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _PartFilter:
    """The part of a filter one cache answers, with what reading it needs."""

    state_filter: StateFilter
    full: bool
    #: The concrete keys asked for, where the filter has no wildcard: a
    #: part that is not full answers if it knows each of them.
    keys: list[StateKey] | None

    @classmethod
    def of(cls, state_filter: StateFilter) -> "_PartFilter":
        keys = None if state_filter.has_wildcards() else list(state_filter.concrete_types())
        return cls(state_filter, state_filter.is_full(), keys)

    def read(self, part: Part | None) -> MutableStateMap[str] | None:
        """What the filter wants of a snapshot's part, if ``part`` holds all of it."""
        if self.keys is not None and not self.keys:
            return {}  # the filter wants nothing of this part
        if part is None:
            return None
        if part.full:
            return self.state_filter.filter_state(part.value)
        if self.full or self.keys is None:
            return None  # which keys of a wildcard type exist is not known
        answer = {}
        for key in self.keys:
            event_id = part.value.get(key)
            if event_id is not None:
                answer[key] = event_id
            elif key not in part.known_absent:
                return None
        return answer


@attr.s(slots=True, frozen=True, auto_attribs=True)
class SplitFilter:
    """A filter split as the caches are (``StateFilter.get_member_split``)."""

    members: _PartFilter
    non_members: _PartFilter

    @property
    def nothing(self) -> bool:
        """Whether the filter wants no key at all."""
        return self.members.keys == [] and self.non_members.keys == []
