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
"""

from typing import TYPE_CHECKING

import attr
from synapse.api.constants import EventTypes
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter
from synapse.util.caches.dictionary_cache import DictionaryCache

if TYPE_CHECKING:
    from synapse.util.clock import Clock

#: snapshot NID -> part of its state, by (type, state key).
StringParts = DictionaryCache[int, tuple[str, str], str]


class SplitStateCache:
    def __init__(self, clock: "Clock", server_name: str, max_entries: int) -> None:
        self.members: StringParts = DictionaryCache(
            name="nidstate_snapshot_members",
            clock=clock,
            server_name=server_name,
            max_entries=max_entries,
        )
        self.non_members: StringParts = DictionaryCache(
            name="nidstate_snapshot_non_members",
            clock=clock,
            server_name=server_name,
            max_entries=max_entries,
        )

    def sequences(self) -> tuple[int, int]:
        """Taken before a read: a fill with them is dropped if a cache was
        invalidated meanwhile (``DictionaryCache.update``)."""
        return self.members.sequence, self.non_members.sequence

    @staticmethod
    def prepare(state_filter: StateFilter) -> "SplitFilter":
        """What :meth:`get` needs of a filter, worked out once per read (not
        per snapshot: a batch of events reads many)."""
        member_filter, non_member_filter = state_filter.get_member_split()
        return SplitFilter(_PartFilter.of(member_filter), _PartFilter.of(non_member_filter))

    def get(self, snapshot_nid: int, wanted: "SplitFilter") -> MutableStateMap[str] | None:
        """The snapshot's state filtered, if both caches hold all the filter wants."""
        non_members = wanted.non_members.read(self.non_members, snapshot_nid)
        if non_members is None:
            return None
        members = wanted.members.read(self.members, snapshot_nid)
        if members is None:
            return None
        non_members.update(members)
        return non_members

    def fill(
        self,
        states: dict[int, StateMap[str]],
        state_filter: StateFilter,
        sequences: tuple[int, int],
    ) -> None:
        """Keep what a read of ``states`` with ``state_filter`` fetched (the
        filter's concrete keys, or all of a part it wants whole)."""
        member_filter, non_member_filter = state_filter.get_member_split()
        # concrete_types() is all the filter fetched unless it has wildcards;
        # with wildcards it names fewer keys than were fetched, which only
        # makes the caches know less.
        member_keys = None if member_filter.is_full() else member_filter.concrete_types()
        non_member_keys = (
            None if non_member_filter.is_full() else non_member_filter.concrete_types()
        )
        for snapshot_nid, state in states.items():
            members: dict[tuple[str, str], str] = {}
            non_members: dict[tuple[str, str], str] = {}
            for key, event_id in state.items():
                (members if key[0] == EventTypes.Member else non_members)[key] = event_id
            self.members.update(
                sequences[0], key=snapshot_nid, value=members, fetched_keys=member_keys
            )
            self.non_members.update(
                sequences[1], key=snapshot_nid, value=non_members, fetched_keys=non_member_keys
            )


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _PartFilter:
    """The part of a filter one cache answers, with what reading it needs."""

    state_filter: StateFilter
    full: bool
    #: The concrete keys asked for, where the filter has no wildcard: the
    #: cache then keeps (and evicts) them one by one.
    keys: list[tuple[str, str]] | None

    @classmethod
    def of(cls, state_filter: StateFilter) -> "_PartFilter":
        keys = None if state_filter.has_wildcards() else list(state_filter.concrete_types())
        return cls(state_filter, state_filter.is_full(), keys)

    def read(self, cache: StringParts, snapshot_nid: int) -> MutableStateMap[str] | None:
        """What the filter wants of the cache's part, if the cache holds all of it."""
        entry = cache.get(snapshot_nid, dict_keys=self.keys)
        if entry.full:
            return self.state_filter.filter_state(entry.value)
        if self.full or self.keys is None:
            return None  # which keys of a wildcard type exist is not known
        for key in self.keys:
            if key not in entry.value and key not in entry.known_absent:
                return None
        return self.state_filter.filter_state(entry.value)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class SplitFilter:
    """A filter split as the caches are (``StateFilter.get_member_split``)."""

    members: _PartFilter
    non_members: _PartFilter
