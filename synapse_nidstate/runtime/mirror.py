"""The mirror: what Synapse persists, recorded as NID snapshots in the same transaction.

Two steps per batch of events Synapse persists (one room, up to 100 events):

1. :meth:`Mirror.prepare` runs before Synapse's transaction (it may await):
   for every state group the batch's events will point at and the mirror does
   not have yet, it plans how to build a snapshot: from the group's predecessor
   plus the delta Synapse computed (from the events' contexts, else from
   ``state_group_edges``), and only as a counted fallback from the full state.
2. :meth:`Mirror.write_txn` runs inside Synapse's persistence transaction,
   right after Synapse wrote ``event_to_state_groups``, and writes the
   snapshots and the events' rows, so both commit or roll back together.
"""

import logging
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

import attr
from synapse.events import EventBase
from synapse.events.snapshot import EventContext
from synapse.storage.database import LoggingTransaction
from synapse.types import StateMap

from synapse_nidstate.runtime.metrics import MIRROR_PLAN_SECONDS, MIRROR_WRITE_SECONDS, MirrorStats
from synapse_nidstate.storage import (
    BLOCK_STRINGS_MIN_ENTRIES,
    Contained,
    EventRow,
    GroupStep,
    KnownStates,
    NidStore,
    WriteScope,
    in_list_clause,
    in_savepoint,
)

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

#: How many state-group edges the planner follows back to a group the mirror
#: has before it reads the full state instead.
MAX_PLAN_HOPS = 16


def state_group_at(event: EventBase, context: EventContext) -> int | None:
    """The group Synapse records in ``event_to_state_groups`` for this event.

    Mirrors ``PersistEventsStore._store_event_state_mappings_txn``: none for an
    outlier (outside MSC4242 rooms), the state before a rejected event, the
    state after any other.
    """
    if (
        not event.room_version.msc4242_state_dags
        and event.internal_metadata.is_outlier()
    ):
        return None
    if context.rejected:
        return context.state_group_before_event
    return context._state_group


@attr.s(slots=True, auto_attribs=True)
class BatchPlan:
    """What :meth:`Mirror.prepare` found for one batch, used by the transaction."""

    steps: list[GroupStep]
    #: The batch's events: a transaction for other events never uses this plan.
    event_ids: frozenset[str] = frozenset()
    scope: WriteScope = attr.Factory(WriteScope)


class SnapshotPlanner:
    """Plans how the mirror builds the snapshots of state groups it lacks.

    A group's snapshot is its predecessor's plus the delta Synapse stored or
    computed (given as ``hints``, else one ``state_group_edges`` hop read
    through Synapse's cached ``get_state_group_delta``). A group with no
    usable predecessor (Synapse stored it as full state: a new room, some
    state-resolution results, the 100-hop limit; or an unmirrored chain longer
    than :data:`MAX_PLAN_HOPS`) needs its full state, read by
    :meth:`with_full_state` so the caller decides when to hold it in memory.
    """

    def __init__(self, hs: "HomeServer", store: NidStore, stats: MirrorStats) -> None:
        self._store = store
        self._state_store = hs.get_datastores().state
        self._state_controller = hs.get_storage_controllers().state
        self._stats = stats

    async def plan(
        self,
        groups: Iterable[int],
        hints: dict[int, tuple[int, StateMap[str]]],
        known_soon: Collection[int] = (),
    ) -> list[GroupStep]:
        """Steps that build every group of ``groups`` the mirror lacks, parents
        first; ``known_soon``: groups taken as built (a batch being written)."""
        needed = set(groups)
        known = set(known_soon) | set(await self._store.known_groups(needed))
        unhinted = needed - known - hints.keys()
        if len(unhinted) > 1:
            # Many groups at once (migration): their deltas in one read, not one
            # each, and whether the mirror has their predecessors in one more.
            hints = {**await self.deltas(unhinted), **hints}
            parents = {prev for group, (prev, _) in hints.items() if group in needed} - needed
            known.update(await self._store.known_groups(parents))
        planned: set[int] = set()
        steps: list[GroupStep] = []
        for group in sorted(needed - known):
            await self._plan_group(group, hints, known, planned, steps, 0)
        return steps

    async def _plan_group(
        self,
        group: int,
        hints: dict[int, tuple[int, StateMap[str]]],
        known: set[int],
        planned: set[int],
        steps: list[GroupStep],
        hops: int,
    ) -> None:
        if group in known or group in planned:
            return
        prev_group: int | None
        delta: StateMap[str] | None
        if group in hints:
            prev_group, delta = hints[group]
        else:
            prev_group, delta = await self._state_controller.get_state_group_delta(group)
        if prev_group is not None and delta is not None and hops < MAX_PLAN_HOPS:
            if prev_group not in known and prev_group not in planned:
                known.update(await self._store.known_groups([prev_group]))
            await self._plan_group(prev_group, hints, known, planned, steps, hops + 1)
            steps.append(GroupStep(group, prev_group, delta, None))
        else:
            steps.append(GroupStep(group, None, None, None))
        planned.add(group)

    async def deltas(self, groups: Collection[int]) -> dict[int, tuple[int, StateMap[str]]]:
        """Predecessor and delta of each of ``groups`` that has one, as Synapse's
        ``get_state_group_delta`` answers one group, for many groups per query."""

        def deltas_txn(txn: LoggingTransaction) -> dict[int, tuple[int, StateMap[str]]]:
            found: dict[int, tuple[int, dict[tuple[str, str], str]]] = {}
            clause, args = in_list_clause(txn.database_engine, "e.state_group", groups)
            txn.execute(
                "SELECT e.state_group, e.prev_state_group, s.type, s.state_key, s.event_id"
                " FROM state_group_edges AS e"
                " LEFT JOIN state_groups_state AS s ON s.state_group = e.state_group"
                f" WHERE {clause}",
                args,
            )
            for group, prev_group, event_type, state_key, event_id in txn:
                _, delta = found.setdefault(group, (prev_group, {}))
                if event_type is not None:
                    delta[(event_type, state_key)] = event_id
            return dict(found)

        return await self._state_store.db_pool.runInteraction("nidstate_plan_deltas", deltas_txn)

    async def with_full_state(
        self,
        step: GroupStep,
        base_group: int | None = None,
        known: KnownStates | None = None,
    ) -> GroupStep:
        """The step with the group's full state read from Synapse's state store,
        or, given ``base_group`` (a group built before it whose state is likely
        close to it), as a delta on that group: their difference, from the
        rows of both chains (``GroupStateStore.difference_txn``; ``known``:
        whole states read earlier, which it also adds to), so that the NIDs of
        a big room's full copy are not looked up whole. Where the difference
        is not a delta, the full state is read, and stored on
        ``base_group``'s snapshot where that shares blocks (``algebra.rebase``)."""
        if not step.needs_full_state:
            return step
        self._stats.full_state_reads += 1
        if base_group is not None:
            change = await self._state_store.db_pool.runInteraction(
                "nidstate_plan_difference",
                self._store.difference_txn,
                step.group,
                base_group,
                self._state_store.db_pool is self._store.db_pool,
                known,
            )
            if change is not None:
                self._stats.full_states_rebased += 1
                self._stats.full_states_by_difference += 1
                return GroupStep(step.group, base_group, change, None)
        state = (await self._state_store._get_state_for_groups([step.group]))[step.group]
        return GroupStep(step.group, None, None, state, base_group)


class Mirror:
    def __init__(self, hs: "HomeServer", store: NidStore, stats: MirrorStats) -> None:
        self._store = store
        self._engine = store.engine
        self.planner = SnapshotPlanner(hs, store, stats)
        self._plan_seconds = MIRROR_PLAN_SECONDS.labels(hs.hostname)
        self._write_seconds = MIRROR_WRITE_SECONDS.labels(hs.hostname)
        self.stats = stats
        #: Set by the module under ``reclaim: eager``: reclaims groups in the
        #: transaction that mirrored them.
        self.eager_reclaim: Callable[[LoggingTransaction, str, list[int]], None] | None = None
        #: Set by the module where it serves state-group reads: told, once a
        #: write commits, which state groups got their snapshots.
        self.written: Callable[[list[int]], None] | None = None
        #: Set by the module: told, once a write commits, that it wrote (or
        #: read) blocks big enough to carry their strings (``block_strings``).
        self.wrote_big_blocks: Callable[[], None] | None = None
        # room_id -> plan of the batch being persisted. Synapse persists one
        # batch per room at a time (its per-room persistence queue).
        self._plans: dict[str, BatchPlan] = {}

    async def prepare(
        self, room_id: str, events_and_contexts: Iterable[tuple[EventBase, EventContext]]
    ) -> BatchPlan:
        """Plan the snapshots the batch needs; never fails the persistence.

        On an error the plan is empty: the events are still recorded, without
        a snapshot, and their lookups fall back to Synapse.
        """
        events_and_contexts = list(events_and_contexts)
        try:
            with self._plan_seconds.time():
                steps = await self._prepare(events_and_contexts)
            return BatchPlan(steps, frozenset(e.event_id for e, _ in events_and_contexts))
        except Exception:
            logger.exception("synapse-nidstate: could not plan snapshots for %s", room_id)
            self.stats.plan_failures += 1
            return BatchPlan([])

    async def _prepare(
        self, events_and_contexts: Iterable[tuple[EventBase, EventContext]]
    ) -> list[GroupStep]:
        """The batch's state groups and the deltas its contexts carry, planned."""
        needed: set[int] = set()
        hints: dict[int, tuple[int, StateMap[str]]] = {}
        for event, context in events_and_contexts:
            group = state_group_at(event, context)
            if group is None or context.partial_state:
                continue
            needed.add(group)
            for (prev_group, to_group), delta in context.state_group_deltas.items():
                if prev_group != to_group:
                    hints[to_group] = (prev_group, delta)
        steps = await self.planner.plan(needed, hints)
        return [await self.planner.with_full_state(s) for s in steps]

    def begin_batch(self, room_id: str, plan: BatchPlan) -> bool:
        if room_id in self._plans:
            logger.error(
                "synapse-nidstate: two batches of %s persisted at once; "
                "the second one's events fall back to Synapse",
                room_id,
            )
            return False
        self._plans[room_id] = plan
        return True

    def end_batch(self, room_id: str) -> None:
        self._plans.pop(room_id, None)

    def write_txn(
        self,
        txn: LoggingTransaction,
        events_and_contexts: Iterable[tuple[EventBase, EventContext]],
    ) -> None:
        """Record the events Synapse just mapped to state groups, in its transaction.

        A failure of the mirror itself is contained in a savepoint: Synapse's
        writes go on and the events are left for the catch-up (their lookups
        fall back). Only a database error Synapse must retry the transaction
        for (``storage.must_retry``: a deadlock, a serialization failure, a lost
        connection, SQLite's "database is locked") is raised, for it to retry.
        """
        events_and_contexts = list(events_and_contexts)
        if not events_and_contexts:
            return
        room_id = events_and_contexts[0][0].room_id
        plan = self._plans.get(room_id)
        if plan is None or any(e.event_id not in plan.event_ids for e, _ in events_and_contexts):
            # Not the batch that was planned: no steps, and a scope of its own.
            plan = BatchPlan([])
        rows = [
            EventRow(
                event_id=event.event_id,
                state_group=None if context.partial_state else state_group_at(event, context),
            )
            for event, context in events_and_contexts
            if state_group_at(event, context) is not None
        ]
        if not rows:
            return
        with self._write_seconds.time():
            self._write_in_savepoint(txn, plan, room_id, rows)

    async def prepare_full_state(self, event: EventBase, context: EventContext) -> BatchPlan:
        """Plan the snapshot of a partial-state event Synapse now gives its full state."""
        return await self.prepare(event.room_id, [(event, context)])

    def write_full_state_txn(
        self, txn: LoggingTransaction, event: EventBase, context: EventContext, plan: BatchPlan
    ) -> None:
        """Give the event the snapshot of its new (full) state group, in the
        transaction where Synapse moves it there and deletes its
        ``partial_state_events`` row. Until then it had no snapshot and fell back."""
        if event.event_id not in plan.event_ids:
            plan = BatchPlan([])
        row = EventRow(
            event_id=event.event_id,
            state_group=state_group_at(event, context),
        )
        with self._write_seconds.time():
            self._write_in_savepoint(txn, plan, event.room_id, [row])

    def _write_in_savepoint(
        self, txn: LoggingTransaction, plan: BatchPlan, room_id: str, rows: list[EventRow]
    ) -> None:
        def write(txn: LoggingTransaction) -> None:
            self._store.mirror_events_txn(txn, plan.scope, room_id, rows, plan.steps, self.stats)

        def failed() -> None:
            plan.scope.discard()
            self.stats.write_failures += 1
            logger.exception(
                "synapse-nidstate: could not mirror %d events of %s; they fall back",
                len(rows),
                room_id,
            )

        if not self._in_savepoint(txn, "nidstate_mirror", write, failed):
            return
        if self.written is not None and plan.steps:
            txn.call_after(self.written, [step.group for step in plan.steps])
        if self.wrote_big_blocks is not None and any(
            len(block) >= BLOCK_STRINGS_MIN_ENTRIES for block in plan.scope.learnt.blocks.values()
        ):
            txn.call_after(self.wrote_big_blocks)
        if self.eager_reclaim is not None:
            groups = sorted(
                {r.state_group for r in rows if r.state_group is not None}
                | {step.group for step in plan.steps}
            )

            def reclaim_failed() -> None:
                self.stats.write_failures += 1
                logger.exception(
                    "synapse-nidstate: could not reclaim the state groups of %s eagerly; "
                    "they keep their rows",
                    room_id,
                )

            eager = self.eager_reclaim
            self._in_savepoint(
                txn, "nidstate_reclaim", lambda t: eager(t, room_id, groups), reclaim_failed
            )

    @staticmethod
    def _in_savepoint(
        txn: LoggingTransaction,
        name: str,
        fn: Callable[[LoggingTransaction], None],
        failed: Callable[[], None],
    ) -> bool:
        """``fn`` in a savepoint of Synapse's transaction (``storage.in_savepoint``):
        a failure of ours rolls back to it and calls ``failed`` (within the
        ``except``, so that it can log the error); one Synapse must retry is raised."""
        try:
            in_savepoint(txn, name, fn)
        except Contained:
            failed()
            return False
        return True
