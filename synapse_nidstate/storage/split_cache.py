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

    def get(self, snapshot_nid: int, state_filter: StateFilter) -> MutableStateMap[str] | None:
        """The snapshot's state filtered, if both caches hold all the filter wants."""
        member_filter, non_member_filter = state_filter.get_member_split()
        non_members = _part(self.non_members, snapshot_nid, non_member_filter)
        if non_members is None:
            return None
        members = _part(self.members, snapshot_nid, member_filter)
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


def _part(
    cache: StringParts, snapshot_nid: int, state_filter: StateFilter
) -> MutableStateMap[str] | None:
    """What ``state_filter`` wants of one cache's part, if the cache holds all of it."""
    # Only the keys asked for, where they are concrete: the cache then keeps
    # (and evicts) them one by one.
    wildcards = state_filter.has_wildcards()
    entry = cache.get(snapshot_nid, dict_keys=None if wildcards else state_filter.concrete_types())
    if entry.full or state_filter.is_full():
        return state_filter.filter_state(entry.value) if entry.full else None
    if wildcards:
        return None  # which keys of a wildcard type exist is not known
    for key in state_filter.concrete_types():
        if key not in entry.value and key not in entry.known_absent:
            return None
    return state_filter.filter_state(entry.value)
