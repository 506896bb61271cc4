"""Comparing the mirror with Synapse's native state-at-event answers."""

from collections.abc import Callable, Iterable

import attr
from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.types.state import StateFilter
from synapse.util.iterutils import batch_iter

from synapse_nidstate.module import NidStateModule

#: Events compared per lookup (what /messages asks at most is 100 too).
BATCH = 100


@attr.s(auto_attribs=True)
class Mismatch:
    event_id: str
    filter_name: str
    differing_keys: list[tuple[str, str]]


@attr.s(auto_attribs=True)
class VerifyResult:
    events: int = 0
    comparisons: int = 0
    unmirrored: list[str] = attr.Factory(list)
    mismatches: list[Mismatch] = attr.Factory(list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def standard_filters(member_sample: Iterable[str]) -> dict[str, StateFilter]:
    """Full state, what visibility checks ask, and what lazy-loading /messages asks."""
    members = list(member_sample)
    return {
        "all": StateFilter.all(),
        "members": StateFilter.from_types([(EventTypes.Member, None)]),
        "lazy_load": StateFilter.from_lazy_load_member_list(members),
        "visibility": StateFilter.from_types(
            [(EventTypes.RoomHistoryVisibility, "")]
            + [(EventTypes.Member, m) for m in members[:1]]
        ),
    }


async def room_events_with_state(hs: HomeServer, room_id: str) -> list[str]:
    """Non-outlier events of a room in stream order (what has state in Synapse)."""
    rows = await hs.get_datastores().main.db_pool.simple_select_list(
        "events",
        {"room_id": room_id, "outlier": False},
        ("event_id", "stream_ordering"),
        desc="nidstate_room_events_with_state",
    )
    return [event_id for event_id, _ in sorted(rows, key=lambda r: r[1])]


async def compare_with_native(
    module: NidStateModule,
    event_ids: list[str],
    filters: dict[str, StateFilter],
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Compare, per event and filter, the mirror's answer with Synapse's own."""
    result = VerifyResult()
    native = module.lookups._native_state_ids
    for batch in batch_iter(event_ids, BATCH):
        for name, state_filter in filters.items():
            expected = await native(batch, state_filter)
            mirrored = await module.lookups.mirrored_state_ids(batch, state_filter)
            for event_id in batch:
                if event_id not in mirrored:
                    if name == "all":
                        result.unmirrored.append(event_id)
                    continue
                result.comparisons += 1
                ours, theirs = mirrored[event_id], expected[event_id]
                if ours != theirs:
                    result.mismatches.append(
                        Mismatch(
                            event_id,
                            name,
                            sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)),
                        )
                    )
        result.events += len(batch)
        if progress is not None:
            progress(len(batch))
    return result
