"""Room histories written through Synapse's own handlers, and the native-vs-mirror check."""

import random
from typing import Any

import attr
from synapse.api.constants import EventTypes, Membership
from synapse.server import HomeServer
from synapse.types.state import StateFilter

from synapse_nidstate.demo.history import Driver
from synapse_nidstate.runtime.module import module_for


@attr.s(auto_attribs=True)
class History:
    rooms: list[str]
    users: list[str]
    rejected: list[str] = attr.Factory(list)
    outliers: list[str] = attr.Factory(list)
    forks: list[str] = attr.Factory(list)


async def build_history(hs: HomeServer, messages_per_room: int = 3) -> History:
    """Rooms with every kind of event the issue names, including a fork and a merge."""
    d = Driver(hs)
    users = [await d.register(name) for name in ("alice", "bob", "carol", "dave", "eve")]
    alice, bob, carol, dave, eve = users
    history = History(rooms=[], users=users)

    # A public room: joins, a leave, a kick, a ban, an invite, power levels,
    # name, topic and join-rule changes, messages.
    public = await d.create_room(alice, "public_chat", name="Public", topic="first")
    history.rooms.append(public)
    for user in (bob, carol, dave):
        await d.membership(user, user, public, Membership.JOIN)
    for i in range(messages_per_room):
        await d.message(bob, public, f"hello {i}")
    await d.send(alice, public, EventTypes.Name, {"name": "Renamed"}, "")
    await d.send(alice, public, EventTypes.Topic, {"topic": "second"}, "")
    await d.send(
        alice,
        public,
        EventTypes.PowerLevels,
        {"users": {bob: 50}, "users_default": 0, "events_default": 0},
        "",
    )
    await d.membership(carol, carol, public, Membership.LEAVE)
    await d.membership(alice, dave, public, "kick", content={"reason": "test"})
    await d.membership(alice, eve, public, Membership.BAN)
    await d.membership(alice, carol, public, Membership.INVITE)
    await d.membership(carol, carol, public, Membership.JOIN)
    await d.send(alice, public, EventTypes.JoinRules, {"join_rule": "invite"}, "")
    await d.message(carol, public, "back")

    # A private room with invites and a fork that needs state resolution: two
    # state events on the same prev event, then an event that merges them.
    private = await d.create_room(alice, "private_chat", name="Private")
    history.rooms.append(private)
    await d.membership(alice, bob, private, Membership.INVITE)
    await d.membership(bob, bob, private, Membership.JOIN)
    base = await d.message(alice, private, "before the fork")
    left = await d.send(
        alice, private, EventTypes.Topic, {"topic": "left"}, "", prev_event_ids=[base.event_id]
    )
    right = await d.send(
        alice, private, EventTypes.Name, {"name": "right"}, "", prev_event_ids=[base.event_id]
    )
    history.forks = [left.event_id, right.event_id]
    merge = await d.message(bob, private, "after the merge")
    assert set(merge.prev_event_ids()) == {left.event_id, right.event_id}, (
        merge.prev_event_ids()
    )

    # A rejected state event (state at it is the state before it) and a
    # rejected message.
    history.rejected.append(
        await d.rejected_event(bob, private, EventTypes.Topic, {"topic": "nope"}, "")
    )
    history.rejected.append(
        await d.rejected_event(bob, private, EventTypes.Message, {"msgtype": "m.text", "body": "nope"}, None)
    )
    await d.message(alice, private, "after the rejections")

    # An outlier, later persisted as a normal event (de-outliered).
    outlier_id, event, context = await d.outlier_then_normal(
        alice, public, EventTypes.Topic, {"topic": "from an outlier"}, ""
    )
    history.outliers.append(outlier_id)
    event.internal_metadata.outlier = False
    await hs.get_storage_controllers().persistence.persist_event(event, context)
    # A second outlier that stays one.
    kept_id, _, _ = await d.outlier_then_normal(
        alice, private, EventTypes.Topic, {"topic": "stays an outlier"}, ""
    )
    history.outliers.append(kept_id)
    await d.message(alice, public, "after the outliers")
    return history


def filters_for(hs: HomeServer, users: list[str]) -> dict[str, StateFilter]:
    """The filters the issue names, built with Synapse's own constructors."""
    return {
        "all": StateFilter.all(),
        "none": StateFilter.none(),
        "members": StateFilter.from_types([(EventTypes.Member, None)]),
        "lazy_load": StateFilter.from_lazy_load_member_list(users[:2] + ["@nobody:x"]),
        "wildcard_key": StateFilter.from_types(
            [(EventTypes.Member, None), (EventTypes.Name, ""), ("m.unknown.type", None)]
        ),
        "include_others": StateFilter.freeze(
            {EventTypes.Member: frozenset({users[1]}), EventTypes.Topic: frozenset()},
            include_others=True,
        ),
        "one_member": StateFilter.from_types([(EventTypes.Member, users[0])]),
        "history_visibility": StateFilter.from_types(
            [(EventTypes.RoomHistoryVisibility, ""), (EventTypes.Member, users[2])]
        ),
    }


async def room_event_ids(hs: HomeServer, room_id: str) -> tuple[list[str], list[str]]:
    """(events with state, outliers) of a room, in stream order, from Synapse's tables."""
    rows = await hs.get_datastores().main.db_pool.simple_select_list(
        "events",
        {"room_id": room_id},
        ("event_id", "outlier", "stream_ordering"),
        desc="nidstate_test_room_events",
    )
    rows = sorted(rows, key=lambda r: r[2])
    return [r[0] for r in rows if not r[1]], [r[0] for r in rows if r[1]]


async def compare_room(
    testcase: Any, hs: HomeServer, room_id: str, filters: dict[str, StateFilter]
) -> int:
    """Assert the mirror's answer equals Synapse's for every event and filter.

    Returns how many (event, filter) pairs were compared. Every non-outlier
    event must be answered by the mirror (no fallback).
    """
    module = module_for(hs)
    assert module is not None
    native = module.lookups.native_state_ids
    event_ids, _ = await room_event_ids(hs, room_id)
    compared = 0
    for name, state_filter in filters.items():
        expected = await native(event_ids, state_filter)
        mirrored = await module.lookups.mirrored_state_ids(event_ids, state_filter)
        testcase.assertEqual(
            set(event_ids) - set(mirrored), set(), f"events not mirrored ({name})"
        )
        for event_id in event_ids:
            testcase.assertEqual(
                dict(mirrored[event_id]),
                dict(expected[event_id]),
                f"state at {event_id} with filter {name}",
            )
            compared += 1
    return compared


def random_filters(users: list[str], count: int, seed: int) -> dict[str, StateFilter]:
    """Filters drawn at random (seeded) over the types and keys the rooms hold, plus
    unknown ones: concrete keys, wildcards, empty key sets, include_others."""
    rng = random.Random(seed)
    types = [
        EventTypes.Member, EventTypes.Name, EventTypes.Topic, EventTypes.PowerLevels,
        EventTypes.JoinRules, EventTypes.Create, EventTypes.RoomHistoryVisibility,
        "m.room.guest_access", "org.example.unknown",
    ]
    keys = users + ["", "@unknown:elsewhere"]
    filters = {}
    for i in range(count):
        spec: dict[str, frozenset[str] | None] = {}
        for event_type in rng.sample(types, rng.randint(0, 4)):
            roll = rng.random()
            if roll < 0.3:
                spec[event_type] = None
            elif roll < 0.4:
                spec[event_type] = frozenset()
            else:
                spec[event_type] = frozenset(rng.sample(keys, rng.randint(1, 3)))
        filters[f"random{i}"] = StateFilter.freeze(spec, include_others=rng.random() < 0.3)
    return filters


def selects_nothing(state_filter: StateFilter) -> bool:
    """Filters Synapse never sends to the database (its PostgreSQL query would be
    empty SQL); the module answers {} for them."""
    return not state_filter.include_others and not any(
        keys is None or keys for keys in state_filter.types.values()
    )


async def all_groups(hs: HomeServer) -> list[int]:
    rows = await hs.get_datastores().state.db_pool.simple_select_list(
        "state_groups", None, ("id",), desc="nidstate_test_groups"
    )
    return sorted(row[0] for row in rows)


async def compare_every_group(
    testcase: Any, hs: HomeServer, filters: dict[str, StateFilter]
) -> int:
    """Synapse's read of every state group through the module (the wrapped
    ``_get_state_groups_from_groups_txn``) against Synapse's own (the class's
    method; where groups are reclaimed, with their proved snapshots), in one
    transaction, for every filter; returns how many were compared."""
    from synapse.storage.databases.state.bg_updates import StateGroupBackgroundUpdateStore

    state = hs.get_datastores().state
    module = module_for(hs)
    assert module is not None

    def native(txn: Any, groups: list[int], f: StateFilter | None) -> Any:
        return StateGroupBackgroundUpdateStore._get_state_groups_from_groups_txn(
            state, txn, groups, f
        )

    groups = await all_groups(hs)
    compared = 0
    for name, state_filter in filters.items():
        if selects_nothing(state_filter):
            continue
        for chunk in (groups[i : i + 50] for i in range(0, len(groups), 50)):

            def both(txn: Any, chunk: list[int] = chunk, f: StateFilter = state_filter) -> Any:
                ours = state._get_state_groups_from_groups_txn(txn, chunk, f)
                # Synapse's own read of its rows (where groups are reclaimed, as
                # verify reads them: a reclaimed group from its proved snapshot).
                theirs = module.group_reads.synapse_answer_txn(txn, chunk, f, native)
                return ours, theirs

            ours, theirs = await state.db_pool.runInteraction("nidstate_test_both", both)
            testcase.assertEqual(set(ours), set(chunk), name)
            for group in chunk:
                testcase.assertEqual(
                    dict(ours[group]), dict(theirs[group]), f"group {group}, filter {name}"
                )
                compared += 1
    return compared


async def compare_every_delta(testcase: Any, hs: HomeServer) -> int:
    """``get_state_group_delta`` of every group through the module against
    Synapse's own (its cache emptied); returns how many groups were compared."""
    module = module_for(hs)
    assert module is not None
    state = hs.get_datastores().state
    compared = 0
    for group in await all_groups(hs):
        ours = await state.get_state_group_delta(group)
        with module.group_reads.native_only(fresh=True):
            state.get_state_group_delta.invalidate_all()
            theirs = await state.get_state_group_delta(group)
        testcase.assertEqual(ours, theirs, f"delta of group {group}")
        compared += 1
    return compared
