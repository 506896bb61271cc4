"""Synapse's reads of a state group's state, answered from the NID tables.

Synapse reads state by state group, not only at events: to compute a new
event's context, resolve state, purge (de-delta before deleting a group others
build on), in background updates. All of them go through
``StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn``, the
recursive read of ``state_groups_state``, except one edge's delta, read by
``StateGroupDataStore.get_state_group_delta`` (``hooks.install_group_reads``
wraps both on the state store). For every group the mirror can answer (it has
the group's snapshot, or the group's delta chain reaches one: ``storage.groups``):

* mode ``serve``: the answer comes from the snapshot; the other groups from
  Synapse's query, in the same transaction;
* mode ``shadow``: both are computed, Synapse's is returned, differences are
  counted and logged.

Only where the state database is Synapse's main database: the NID tables are
in main, and a transaction of a separate state database cannot read them.
"""

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from typing import Any

from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.storage.database import LoggingTransaction
from synapse.storage.databases.state.store import _GetStateGroupDelta
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter

from synapse_nidstate.runtime.faults import FaultLog, StateUnavailable
from synapse_nidstate.runtime.lookups import MAX_LOGGED_MISMATCHES
from synapse_nidstate.runtime.metrics import GROUP_READ_SECONDS, LookupStats
from synapse_nidstate.storage import Contained, NidStore, in_savepoint

logger = logging.getLogger(__name__)

#: Synapse's ``_get_state_groups_from_groups_txn``, as bound on its state store.
NativeGroupRead = Callable[
    [LoggingTransaction, list[int], StateFilter | None], Mapping[int, StateMap[str]]
]
#: Synapse's (cached) ``get_state_group_delta``, as bound on its state store.
NativeDeltaRead = Callable[[int], Awaitable[_GetStateGroupDelta]]


class GroupReads:
    def __init__(
        self,
        store: NidStore,
        stats: LookupStats,
        mode: str,
        server_name: str,
        faults: FaultLog | None = None,
    ) -> None:
        """``mode``: the module's, or ``native`` (the CLI's verify): always
        Synapse's own answer, reclaimed groups from their proved snapshots."""
        self._store = store
        self._stats = stats
        self._mode = mode
        self._mirror_seconds = GROUP_READ_SECONDS.labels(server_name, "mirror")
        self._native_seconds = GROUP_READ_SECONDS.labels(server_name, "native")
        self._logged = 0
        self._faults = faults if faults is not None else FaultLog()
        #: The state store whose readers are wrapped.
        self._installed: Any = None
        self._native_depth = 0
        #: Within ``native_only(alone=True)``: Synapse's method and nothing else.
        self._alone_depth = 0
        #: Whether :meth:`check_timeable` found no reclaimed group.
        self._timeable = False

    @property
    def store(self) -> NidStore:
        return self._store

    def serves_from_caches(self) -> bool:
        """Whether the module's caches answer group reads (``group_caches``):
        mode ``serve``, outside :meth:`native_only`."""
        return self._mode == "serve" and not self._native_depth

    def served_from_caches(self, groups: int, seconds: float) -> None:
        """Count groups answered from the module's caches, and the time taken."""
        if groups:
            self._stats.served += groups
            self._mirror_seconds.observe(seconds)

    def forget_synapse_copies(self, groups: Collection[int]) -> None:
        """After the mirror committed ``groups``' snapshots: in serve, the
        module's caches answer for them (``group_caches``), so Synapse's own
        copies go (``store_state_group`` puts a group it stores in full there)."""
        if self._installed is None or self._mode != "serve":
            return
        for group in groups:
            self._installed._state_group_cache.invalidate(group)
            self._installed._state_group_members_cache.invalidate(group)

    def installed(self, state_store: Any) -> None:
        """Called by ``hooks.install_group_reads`` once it has wrapped the readers."""
        self._installed = state_store

    async def check_timeable(self) -> None:
        """Before a timing of Synapse alone (``native_only(alone=True)``):
        refuse a database where any group is reclaimed, whose rows Synapse's
        own read no longer has."""
        reclaimed = await self._store.db_pool.runInteraction(
            "nidstate_check_timeable", self._store.reclaim_marked_txn
        )
        if reclaimed:
            raise RuntimeError(
                "state groups are reclaimed: Synapse's own reads cannot be timed alone"
            )
        self._timeable = True

    @contextlib.contextmanager
    def native_only(self, fresh: bool, alone: bool = False) -> Iterator[None]:
        """Within: Synapse's reads of state groups are Synapse's own again
        (:meth:`synapse_answer_txn`), so that a comparison or a timing of Synapse's
        answer never sees the mirror. ``fresh`` also empties Synapse's per-group
        caches first (they may hold what the mirror served). Other reads
        meanwhile are Synapse's too, which is correct (reclaimed groups included).

        ``alone`` (timings): exactly Synapse's method, as a server without the
        module runs it, not even the check for the reclaim marker that
        :meth:`synapse_answer_txn` makes (a statement a read: it made Synapse
        look 0.25 ms slower per cold read at M, ``benchmarks.profile --compare``
        before 2026-12-07). Only after :meth:`check_timeable`."""
        if self._installed is None:
            yield
            return
        if alone and not self._timeable:
            raise RuntimeError("GroupReads.check_timeable must pass before timing Synapse alone")
        state_store = self._installed
        self._native_depth += 1
        self._alone_depth += alone
        if fresh:
            state_store._state_group_cache.invalidate_all()
            state_store._state_group_members_cache.invalidate_all()
        try:
            yield
        finally:
            self._native_depth -= 1
            self._alone_depth -= alone

    def synapse_answer_txn(
        self,
        txn: LoggingTransaction,
        groups: list[int],
        state_filter: StateFilter,
        native: NativeGroupRead,
    ) -> Mapping[int, StateMap[str]]:
        """Synapse's own answer: its read of its rows, or where groups are
        reclaimed, the same walk taking a reclaimed group's state from the
        snapshot that reclaim proved equal to it (``storage.reclaim``).

        Whether any group is reclaimed is read from Synapse's own table (the
        marker), so this holds when the module's tables are what failed. A
        failure to read a reclaimed group's snapshot fails the read
        (:class:`StateUnavailable`): Synapse's rows for it are gone."""
        if not self._store.reclaim_marked_txn(txn):
            return self._native(txn, groups, state_filter, native)
        try:
            ours = in_savepoint(
                txn,
                "nidstate_reclaimed_read",
                lambda t: self._store.synapse_states_txn(t, groups, state_filter),
            )
        except Contained as e:
            self._stats.unavailable += len(groups)
            what = _groups_named(groups)
            self._faults.report(what, e, fallback=False)
            raise StateUnavailable(f"{what} could not be read") from e
        answer: dict[int, StateMap[str]] = dict(ours)
        rest = [g for g in groups if g not in answer]
        if rest:
            answer.update(self._native(txn, rest, state_filter, native))
        return answer

    def read_txn(
        self,
        txn: LoggingTransaction,
        groups: list[int],
        state_filter: StateFilter | None,
        native: NativeGroupRead,
        direct: set[int] | None = None,
        contained: bool = True,
    ) -> Mapping[int, StateMap[str]]:
        """What ``_get_state_groups_from_groups_txn(txn, groups, state_filter)``
        answers: every group a key, its state filtered. ``direct`` (serve) gets
        the groups served from their own snapshot (see ``group_caches``).

        The mirror's read runs in a savepoint of ``txn`` (Synapse's), so that a
        failure is answered by Synapse in the same transaction; with
        ``contained=False`` (``txn`` is the module's own) it runs without
        one and a failure is raised, for the caller to answer in a new
        transaction (:meth:`after_failure`): two statements fewer."""
        if state_filter is None:
            state_filter = StateFilter.all()
        if self._alone_depth:
            return native(txn, groups, state_filter)
        if self._native_depth or self._mode == "native":
            return self.synapse_answer_txn(txn, groups, state_filter, native)
        started = time.perf_counter()
        invalidations = self._store.invalidations

        def mirror_read(t: LoggingTransaction) -> dict[int, MutableStateMap[str]]:
            return self._store.state_for_groups_txn(t, groups, state_filter, direct)

        try:
            # In a savepoint: a failed statement must not abort Synapse's transaction.
            ours = (
                in_savepoint(txn, "nidstate_group_read", mirror_read)
                if contained
                else mirror_read(txn)
            )
        except Contained as e:
            if direct is not None:
                direct.clear()
            self._faults.report(_groups_named(groups), e, fallback=True)
            fallback = self.synapse_answer_txn(txn, groups, state_filter, native)
            self._stats.failed += len(groups)
            return fallback
        mirror_seconds = time.perf_counter() - started
        # After the read's own cache fills, once Synapse's transaction commits.
        txn.call_after(self._store.forget_if_invalidated_since, invalidations)
        rest = [g for g in groups if g not in ours]
        self._stats.fallback += len(rest)
        if self._mode == "serve":
            self._stats.served += len(ours)
            if ours:
                self._mirror_seconds.observe(mirror_seconds)
            if not rest:
                return ours
            answer: dict[int, StateMap[str]] = dict(ours)
            answer.update(self._native(txn, rest, state_filter, native))
            return answer
        theirs = self._native(txn, groups, state_filter, native)
        for group, state in ours.items():
            self._stats.compared += 1
            if state != dict(theirs.get(group, {})):
                self._stats.mismatched += 1
                self._log_mismatch(group, state_filter, theirs.get(group, {}), state)
        return theirs

    async def after_failure(
        self,
        error: Exception,
        groups: list[int],
        state_filter: StateFilter,
        native: NativeGroupRead,
    ) -> Mapping[int, StateMap[str]]:
        """The mirror's read of ``groups`` in a transaction of its own failed
        (``read_txn(contained=False)``): Synapse's answer, in a new one."""
        self._faults.report(_groups_named(groups), error, fallback=True)
        answer = await self._store.db_pool.runInteraction(
            "_get_state_groups_from_groups",
            self.synapse_answer_txn,
            groups,
            state_filter,
            native,
        )
        self._stats.failed += len(groups)
        return answer

    async def get_state_group_delta(
        self, state_group: int, native: NativeDeltaRead
    ) -> _GetStateGroupDelta:
        """What ``get_state_group_delta(state_group)`` answers: the group's
        predecessor and the delta from it.

        Mode ``serve`` (and ``native``): Synapse's answer from Synapse's cache
        (``native.cache``, the one its ``@cached`` fills) or, on a miss, from
        one transaction that reads the edge and the delta rows as Synapse does
        and, where the group has a predecessor and no rows, the difference
        from it if the group is reclaimed (:meth:`delta_or_reclaimed_txn`): one
        transaction per miss, as Synapse's own. Mode ``shadow``: that
        difference for every group the mirror has (:meth:`delta_txn`),
        compared with Synapse's answer, which is returned."""
        if self._alone_depth:
            return await native(state_group)
        if self._native_depth:
            return await self._native_delta(state_group, native)
        if self._mode == "shadow":
            return await self._shadow_delta(state_group, native)
        cache = native.cache  # type: ignore[attr-defined]
        try:
            pending = cache.get(state_group)
        except KeyError:
            pending = cache.set(
                state_group,
                run_in_background(
                    self._store.db_pool.runInteraction,
                    "get_state_group_delta",
                    self.delta_or_reclaimed_txn,
                    state_group,
                ),
            )
        return await make_deferred_yieldable(pending)

    async def _native_delta(
        self, state_group: int, native: NativeDeltaRead
    ) -> _GetStateGroupDelta:
        """Within :meth:`native_only`: Synapse's own method (what a timing of
        Synapse measures); a reclaimed group's answer, which Synapse's method
        reads as no delta, then replaced in Synapse's cache by the right one."""
        theirs = await native(state_group)
        if theirs.prev_group is None or theirs.delta_ids:
            return theirs
        ours = await self._store.db_pool.runInteraction(
            "nidstate_reclaimed_group_delta", self.synapse_delta_txn, state_group
        )
        if ours is None:
            return theirs  # not reclaimed: the group's state equals its predecessor's
        native.prefill((state_group,), ours)  # type: ignore[attr-defined]
        return ours

    async def _shadow_delta(
        self, state_group: int, native: NativeDeltaRead
    ) -> _GetStateGroupDelta:
        theirs = await native(state_group)
        ours = await self._store.db_pool.runInteraction(
            "nidstate_get_state_group_delta", self.delta_txn, state_group
        )
        if ours is None:
            self._stats.fallback += 1
            return theirs
        self._stats.compared += 1
        if ours != theirs:
            self._stats.mismatched += 1
            self._log_mismatch(
                state_group,
                None,
                {**(theirs.delta_ids or {}), ("prev_group", ""): str(theirs.prev_group)},
                {**(ours.delta_ids or {}), ("prev_group", ""): str(ours.prev_group)},
            )
        return theirs

    def delta_or_reclaimed_txn(
        self, txn: LoggingTransaction, group: int
    ) -> _GetStateGroupDelta:
        """Synapse's ``_get_state_group_delta_txn`` answer: the edge, then the
        group's rows; a group with a predecessor and no rows may be reclaimed
        (rows are only ever deleted whole), and its delta is then
        :meth:`_reclaimed_delta_txn`'s."""
        prev = self._store.prev_groups_txn(txn, [group]).get(group)
        if prev is None:
            return _GetStateGroupDelta(None, None)
        rows = self._store.group_rows_txn(txn, [group])[group]
        if not rows:
            try:
                reclaimed = in_savepoint(
                    txn, "nidstate_delta", lambda t: self._reclaimed_delta_txn(t, group, prev)
                )
            except Contained as e:
                # Reclaimed or not is unknown: only an unmarked database proves not.
                if self._store.reclaim_marked_txn(txn):
                    self._stats.unavailable += 1
                    self._faults.report(f"the delta of state group {group}", e, fallback=False)
                    raise StateUnavailable(f"the delta of state group {group}") from e
                self._stats.failed += 1
                self._faults.report(f"the delta of state group {group}", e, fallback=True)
                reclaimed = None
            if reclaimed is not None:
                if self._mode == "serve":
                    self._stats.served += 1
                return reclaimed
        return _GetStateGroupDelta(prev, rows)

    def synapse_delta_txn(
        self, txn: LoggingTransaction, group: int
    ) -> _GetStateGroupDelta | None:
        """Synapse's own answer for a reclaimed group (its delta rows are gone):
        the difference between its proved state and its predecessor's, as
        :meth:`synapse_answer_txn` reads them; None for any other group, whose
        rows Synapse reads itself."""
        prev = self._store.prev_groups_txn(txn, [group]).get(group)
        if prev is None:
            if not self._store.reclaimed_anchors_txn(txn, [group]):
                return None
            return _GetStateGroupDelta(None, None)
        return self._reclaimed_delta_txn(txn, group, prev)

    def _reclaimed_delta_txn(
        self, txn: LoggingTransaction, group: int, prev: int
    ) -> _GetStateGroupDelta | None:
        """:meth:`synapse_delta_txn` for a group whose predecessor is ``prev``."""
        if not self._store.reclaimed_anchors_txn(txn, [group]):
            return None
        states = self._store.synapse_states_txn(txn, [group, prev], StateFilter.all())
        return _difference(prev, states.get(group), states.get(prev))

    def delta_txn(self, txn: LoggingTransaction, group: int) -> _GetStateGroupDelta | None:
        """The group's predecessor and the entries where the group's state
        differs from it; None where the mirror cannot answer for both.

        Synapse stores a delta group only where the new state keeps every key of
        the old (``StateGroupDataStore.store_state_group``; a state that drops a
        key is stored in full), and the delta is what differs (``StateHandler``
        computes ``delta_ids`` so); a difference that drops a key is left to
        Synapse."""
        if group not in self._store.known_groups_txn(txn, [group]):
            return None
        prev = self._store.prev_groups_txn(txn, [group]).get(group)
        if prev is None:
            return _GetStateGroupDelta(None, None)
        states = self._store.state_for_groups_txn(txn, [group, prev], StateFilter.all())
        return _difference(prev, states.get(group), states.get(prev))

    def _native(
        self,
        txn: LoggingTransaction,
        groups: list[int],
        state_filter: StateFilter,
        native: NativeGroupRead,
    ) -> Mapping[int, StateMap[str]]:
        started = time.perf_counter()
        try:
            return native(txn, groups, state_filter)
        finally:
            self._native_seconds.observe(time.perf_counter() - started)

    def _log_mismatch(
        self,
        group: int,
        state_filter: StateFilter | None,
        theirs: StateMap[str],
        ours: StateMap[str],
    ) -> None:
        if self._logged >= MAX_LOGGED_MISMATCHES:
            return
        self._logged += 1
        differing = sorted(
            key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key)
        )
        logger.warning(
            "synapse-nidstate: state group %d differs from Synapse's (%s): keys %s",
            group,
            "delta" if state_filter is None else f"filter {state_filter}",
            differing[:20],
        )


def _groups_named(groups: list[int]) -> str:
    shown = ", ".join(map(str, groups[:5]))
    return f"state group{'s' if len(groups) > 1 else ''} {shown}" + (
        f" and {len(groups) - 5} more" if len(groups) > 5 else ""
    )


def _difference(
    prev: int, new: StateMap[str] | None, old: StateMap[str] | None
) -> _GetStateGroupDelta | None:
    """``prev`` and the entries where ``new`` differs from ``old``; None where
    either is unknown or ``new`` drops a key of ``old`` (no delta expresses it)."""
    if new is None or old is None or not old.keys() <= new.keys():
        return None
    return _GetStateGroupDelta(prev, {k: v for k, v in new.items() if old.get(k) != v})
