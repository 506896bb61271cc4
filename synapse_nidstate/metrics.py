"""Every counter the module keeps, in one place.

The counters are plain attributes of one :class:`NidStateStats` per module
instance (so in-process tests read exact numbers), exported to Prometheus
through Synapse's registry by :class:`StatsCollector`.
"""

import weakref
from collections.abc import Iterator

import attr
from prometheus_client.core import REGISTRY, CounterMetricFamily, Metric
from prometheus_client.registry import Collector


@attr.s(slots=True, auto_attribs=True)
class MirrorStats:
    """What the write side did."""

    #: events recorded with a snapshot
    events_mirrored: int = 0
    #: snapshots written for new state groups
    snapshots_built: int = 0
    #: of those, the ones that hit the 64-block limit and were compacted
    compactions: int = 0
    #: state groups whose full state had to be read (no usable predecessor)
    full_state_reads: int = 0
    #: events whose state group had neither a snapshot nor a plan
    unprepared: int = 0
    #: batches whose planning failed (their events fall back)
    plan_failures: int = 0
    #: batches whose mirror writes were rolled back to the savepoint
    write_failures: int = 0


@attr.s(slots=True, auto_attribs=True)
class LookupStats:
    """What the read side did, counted per event looked up."""

    #: answered from the NID tables (mode serve)
    served: int = 0
    #: answered by Synapse because the mirror had no snapshot for the event
    fallback: int = 0
    #: computed both ways (mode shadow)
    compared: int = 0
    #: of those, the answers that differed
    mismatched: int = 0


@attr.s(slots=True, auto_attribs=True, eq=False)
class NidStateStats:
    server_name: str
    mirror: MirrorStats = attr.Factory(MirrorStats)
    lookups: LookupStats = attr.Factory(LookupStats)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"mirror": attr.asdict(self.mirror), "lookups": attr.asdict(self.lookups)}


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
        mirror = CounterMetricFamily(
            "synapse_nidstate_mirror",
            "What the mirror did while Synapse persisted events",
            labels=["server_name", "what"],
        )
        for stats in list(self._stats):
            for outcome, value in attr.asdict(stats.lookups).items():
                lookups.add_metric([stats.server_name, outcome], value)
            for what, value in attr.asdict(stats.mirror).items():
                mirror.add_metric([stats.server_name, what], value)
        yield lookups
        yield mirror


COLLECTOR = StatsCollector()
REGISTRY.register(COLLECTOR)
