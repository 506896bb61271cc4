"""Every counter the module keeps, in one place.

Timings are prometheus_client histograms, as Synapse's own. The counters are
plain attributes of one :class:`NidStateStats` per module instance, exported
through Synapse's registry by :class:`StatsCollector`, because the module
reads them back: the status endpoint and ``demo`` report them, and tests
assert exact numbers per homeserver. prometheus_client has no public read of a
counter's value, and its labelled children outlive the homeserver that
incremented them (a process may run several: tests, Synapse's own suite); the
collector exports the live instances only (a weak set), with the same names
and ``_total`` suffix a ``Counter`` would have.
"""

import weakref
from collections.abc import Iterator

import attr
from prometheus_client import Histogram
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from synapse.metrics import SERVER_NAME_LABEL

#: Time to answer one state-at-event lookup batch, by who answered it.
LOOKUP_SECONDS = Histogram(
    "synapse_nidstate_lookup_seconds",
    "Time to answer a batch of state-at-event lookups",
    labelnames=[SERVER_NAME_LABEL, "path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
#: Time to read the state of a batch of state groups, by who answered it.
GROUP_READ_SECONDS = Histogram(
    "synapse_nidstate_group_read_seconds",
    "Time to read the state of a batch of state groups",
    labelnames=[SERVER_NAME_LABEL, "path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
#: Time the mirror adds inside Synapse's persistence transaction, per batch.
MIRROR_WRITE_SECONDS = Histogram(
    "synapse_nidstate_mirror_write_seconds",
    "Time the mirror spends in Synapse's persist_events transaction, per batch",
    labelnames=[SERVER_NAME_LABEL],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)
#: Time the mirror spends planning a batch's snapshots before the transaction.
MIRROR_PLAN_SECONDS = Histogram(
    "synapse_nidstate_mirror_plan_seconds",
    "Time the mirror spends before Synapse's persist_events transaction, per batch",
    labelnames=[SERVER_NAME_LABEL],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)


@attr.s(slots=True, auto_attribs=True)
class MirrorStats:
    """What the write side did."""

    #: events recorded with a snapshot
    events_mirrored: int = 0
    #: snapshots written for new state groups
    snapshots_built: int = 0
    #: of those, the ones that hit the 64-block limit and were compacted
    compactions: int = 0
    #: of those, the ones that hit the limit and merged their last blocks
    #: with their change instead (``algebra.merge_point``)
    tail_merges: int = 0
    #: state groups whose full state had to be read (no usable predecessor)
    full_state_reads: int = 0
    #: of those, the ones stored as a small difference on a similar snapshot
    #: (``algebra.rebase``) rather than compacted
    full_states_rebased: int = 0
    #: of those, the ones built as a delta on that snapshot's group, from the
    #: rows of both chains, rather than read whole (``GroupStateStore.difference_txn``)
    full_states_by_difference: int = 0
    #: events whose state group had neither a snapshot nor a plan
    unprepared: int = 0
    #: batches whose planning failed (their events fall back)
    plan_failures: int = 0
    #: batches whose mirror writes were rolled back to the savepoint
    write_failures: int = 0


@attr.s(slots=True, auto_attribs=True)
class LookupStats:
    """What the read side did, counted per event (or state group) looked up."""

    #: answered from the NID tables (mode serve)
    served: int = 0
    #: answered by Synapse because the mirror had no snapshot for the event
    fallback: int = 0
    #: computed both ways (mode shadow)
    compared: int = 0
    #: of those, the answers that differed
    mismatched: int = 0
    #: the mirror's read failed and Synapse's rows answered (``runtime.faults``)
    failed: int = 0
    #: the mirror's read failed where Synapse's rows are reclaimed: the request
    #: failed (``StateUnavailable``) rather than answer a wrong state
    unavailable: int = 0


@attr.s(slots=True, auto_attribs=True)
class MigrationStats:
    """What the migration in this process did (CLI or background job)."""

    #: events the migration's batches covered: each is answered from a snapshot
    #: once its batch commits (its group built by that batch, an earlier one or
    #: the live mirror; partial-state events are not counted)
    events_migrated: int = 0
    #: batches committed
    batches: int = 0
    #: Synapse's newest stream position minus the newest one migrated
    #: (0: caught up; -1: not known yet)
    lag_stream_positions: int = -1


@attr.s(slots=True, auto_attribs=True)
class BlockStringsStats:
    """Blocks given the strings of their entries (schema 7,
    ``storage/block_strings.py``) in this process: never needed for an
    answer, only for the speed of whole reads, so a failure is counted here
    (and logged) rather than failing anything."""

    #: by the migration (the history's blocks; the CLI or the background job)
    by_migration: int = 0
    #: by the live filler, after the writes of the live mirror
    live: int = 0
    #: runs of the live filler that failed (the next big write tries again)
    live_failures: int = 0


@attr.s(slots=True, auto_attribs=True)
class ReclaimStats:
    """What reclaim and restore did in this process (CLI, background job, eager)."""

    #: groups whose rows were deleted, each proved first
    groups_reclaimed: int = 0
    #: rows of state_groups_state deleted
    rows_deleted: int = 0
    #: groups whose rows stayed: Synapse's answer differed from the snapshot
    groups_refused: int = 0
    #: groups whose rows were written back
    groups_restored: int = 0
    #: rows written back
    rows_restored: int = 0


@attr.s(slots=True, auto_attribs=True, eq=False)
class NidStateStats:
    server_name: str
    mirror: MirrorStats = attr.Factory(MirrorStats)
    lookups: LookupStats = attr.Factory(LookupStats)
    #: Synapse's reads of state groups (same outcomes, counted per group)
    group_reads: LookupStats = attr.Factory(LookupStats)
    migration: MigrationStats = attr.Factory(MigrationStats)
    reclaim: ReclaimStats = attr.Factory(ReclaimStats)
    block_strings: BlockStringsStats = attr.Factory(BlockStringsStats)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "mirror": attr.asdict(self.mirror),
            "lookups": attr.asdict(self.lookups),
            "group_reads": attr.asdict(self.group_reads),
            "migration": attr.asdict(self.migration),
            "reclaim": attr.asdict(self.reclaim),
            "block_strings": attr.asdict(self.block_strings),
        }


class StatsCollector(Collector):
    """Exports every live module instance's counters (one per homeserver)."""

    def __init__(self) -> None:
        self._stats: weakref.WeakSet[NidStateStats] = weakref.WeakSet()

    def add(self, stats: NidStateStats) -> None:
        self._stats.add(stats)

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "synapse_nidstate_lookups",
            "Events whose state was looked up, by outcome",
            labels=["server_name", "outcome"],
        )
        group_reads = CounterMetricFamily(
            "synapse_nidstate_group_reads",
            "State groups whose state Synapse read, by outcome",
            labels=["server_name", "outcome"],
        )
        mirror = CounterMetricFamily(
            "synapse_nidstate_mirror",
            "What the mirror did while Synapse persisted events",
            labels=["server_name", "what"],
        )
        migrated = CounterMetricFamily(
            "synapse_nidstate_migration_events",
            "Events the migration of history gave a snapshot, in this process",
            labels=["server_name"],
        )
        reclaim = CounterMetricFamily(
            "synapse_nidstate_reclaim",
            "State groups and rows of state_groups_state reclaimed, refused and "
            "restored, in this process",
            labels=["server_name", "what"],
        )
        block_strings = CounterMetricFamily(
            "synapse_nidstate_block_strings",
            "Blocks given the strings of their entries, by the migration and live, and "
            "the live filler's failed runs, in this process",
            labels=["server_name", "what"],
        )
        lag = GaugeMetricFamily(
            "synapse_nidstate_migration_lag_stream_positions",
            "Synapse's newest stream position minus the newest one migrated (-1: unknown)",
            labels=["server_name"],
        )
        for stats in list(self._stats):
            for outcome, value in attr.asdict(stats.lookups).items():
                lookups.add_metric([stats.server_name, outcome], value)
            for outcome, value in attr.asdict(stats.group_reads).items():
                group_reads.add_metric([stats.server_name, outcome], value)
            for what, value in attr.asdict(stats.mirror).items():
                mirror.add_metric([stats.server_name, what], value)
            for what, value in attr.asdict(stats.reclaim).items():
                reclaim.add_metric([stats.server_name, what], value)
            for what, value in attr.asdict(stats.block_strings).items():
                block_strings.add_metric([stats.server_name, what], value)
            migrated.add_metric([stats.server_name], stats.migration.events_migrated)
            lag.add_metric([stats.server_name], stats.migration.lag_stream_positions)
        yield lookups
        yield group_reads
        yield mirror
        yield migrated
        yield lag
        yield reclaim
        yield block_strings


COLLECTOR = StatsCollector()
REGISTRY.register(COLLECTOR)
