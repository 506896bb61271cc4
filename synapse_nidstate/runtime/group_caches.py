"""Synapse's read of state groups with its caches, where the module's caches
stand in for Synapse's per-group ones.

``StateGroupDataStore._get_state_for_groups`` (every read of a group's state:
new events' contexts, state resolution, ``get_state_for_groups``) looks in two
per-group caches (``_state_group_cache``, ``_state_group_members_cache``),
reads the misses from the database and keeps what it read there, as strings,
per group. With the module serving, that read is the module's
(``group_reads``), which keeps the state in its own caches, per snapshot, once
for all the groups and events that share it, or as changes against a base
(``storage.resolved``): Synapse's copy beside it would hold the same state a
second time, in about twenty times the bytes.

So in mode ``serve`` the module replaces the method (``hooks``): a group whose
snapshot and state are in the module's caches is answered from them on the
reactor thread, without a transaction, as Synapse answers from its caches; a
miss is read in one transaction per 100 groups, as Synapse does, through the
same read as Synapse's (``group_reads.read_txn``; a failure is answered by
Synapse in a new transaction, as the state-at-event lookups do); and only what Synapse's own
rows answered (a group the mirror has no snapshot for) goes into Synapse's
caches, by Synapse's own rule. The module's caches are invalidated as Synapse's
are: never for an existing group (a group's state never changes), and whole on
a purge (``storage.purge``). Elsewhere (``shadow``; within ``native_only``, where
Synapse's own answer is wanted) the method is Synapse's.
"""

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from synapse.logging.opentracing import tag_args, trace
from synapse.types import MutableStateMap
from synapse.types.state import StateFilter
from synapse.util.cancellation import cancellable
from synapse.util.iterutils import batch_iter
from twisted.internet.defer import CancelledError

from synapse_nidstate.runtime.group_reads import GroupReads, NativeGroupRead

#: Synapse's ``_get_state_for_groups``, as bound on its state store.
NativeGroupsRead = Callable[..., Awaitable[dict[int, MutableStateMap[str]]]]

#: Groups per transaction, as ``StateGroupDataStore._get_state_groups_from_groups``.
GROUPS_PER_TRANSACTION = 100


class GroupCaches:
    def __init__(
        self,
        group_reads: GroupReads,
        state_store: Any,
        native: NativeGroupsRead,
        native_read_txn: NativeGroupRead,
    ) -> None:
        """``native``: Synapse's ``_get_state_for_groups``; ``native_read_txn``:
        its ``_get_state_groups_from_groups_txn`` (both as Synapse bound them)."""
        self._reads = group_reads
        self._state_store = state_store
        self._native = native
        self._native_read_txn = native_read_txn

    # Synapse's own decorators, so that a trace shows the same spans and tags
    # (compat.REQUIREMENTS checks that a replaced method is traced as Synapse's is).
    @trace
    @tag_args
    @cancellable
    async def _get_state_for_groups(
        self, groups: Iterable[int], state_filter: StateFilter | None = None
    ) -> dict[int, MutableStateMap[str]]:
        """Replacement of ``StateGroupDataStore._get_state_for_groups``: the
        state of each group, filtered (a dict each caller may change)."""
        if state_filter is None:
            state_filter = StateFilter.all()
        if not self._reads.serves_from_caches():
            return await self._native(groups, state_filter)
        wanted = list(dict.fromkeys(groups))
        started = time.perf_counter()
        answer = self._reads.store.cached_state_for_groups(wanted, state_filter)
        self._reads.served_from_caches(len(answer), time.perf_counter() - started)
        rest = [g for g in wanted if g not in answer]
        if not rest:
            return answer

        # Synapse's caches hold what Synapse's rows answered (groups the mirror
        # had no snapshot for when they were read): look there as Synapse would.
        state = self._state_store
        # Entries, not the caches' sizes: an entry for a group with no
        # state (the one before a room's create event) has size 0.
        if len(state._state_group_cache.cache.cache) or len(
            state._state_group_members_cache.cache.cache
        ):
            member_filter, non_member_filter = state_filter.get_member_split()
            non_members, incomplete = state._get_state_for_groups_using_cache(
                rest, state._state_group_cache, non_member_filter
            )
            members, incomplete_members = state._get_state_for_groups_using_cache(
                rest, state._state_group_members_cache, member_filter
            )
            incomplete |= incomplete_members
            for group in rest:
                if group not in incomplete:
                    answer[group] = {**non_members[group], **members[group]}
            if not incomplete:
                return answer
        elif not state_filter:  # StateFilter's own test: a filter that wants no key
            # What Synapse's two looks answer for such a filter, empty
            # caches or not: each group, empty, without a read.
            answer.update((group, {}) for group in rest)
            return answer
        else:
            # Both empty, as they mostly are while the module serves: two
            # misses a group, each a traced call of Synapse's, answer nothing.
            incomplete = set(rest)

        sequence_non_members = state._state_group_cache.sequence
        sequence_members = state._state_group_members_cache.sequence
        # As Synapse: the filter a little wider, for the caches' hit ratio.
        db_filter = state_filter.return_expanded()
        for chunk in batch_iter(sorted(incomplete), GROUPS_PER_TRANSACTION):
            groups_read = list(chunk)
            direct: set[int] = set()
            try:
                # The module's own transaction: no savepoint (read_txn).
                read = await state.db_pool.runInteraction(
                    "_get_state_groups_from_groups",
                    self._reads.read_txn,
                    groups_read,
                    db_filter,
                    self._native_read_txn,
                    direct,
                    False,
                )
            except CancelledError:
                raise
            except Exception as e:
                direct.clear()
                read = await self._reads.after_failure(
                    e, groups_read, db_filter, self._native_read_txn
                )
            synapses = {g: s for g, s in read.items() if g not in direct}
            if synapses:
                state._insert_into_cache(
                    synapses,
                    db_filter,
                    cache_seq_num_members=sequence_members,
                    cache_seq_num_non_members=sequence_non_members,
                )
            for group, group_state in read.items():
                answer[group] = state_filter.filter_state(group_state)
        return answer
