"""Room histories written through Synapse's own handlers, as clients would write them.

Used by the demo, the tests and (later) the benchmarks: everything here goes
through Synapse's room-creation, membership and event-creation handlers, so
state groups, contexts and persistence are Synapse's own.
"""

import random
from collections.abc import Callable
from typing import Any

import attr
from synapse.api.constants import EventTypes, Membership, RejectedReason
from synapse.events import EventBase
from synapse.events.snapshot import EventContext
from synapse.server import HomeServer
from synapse.types import Requester, UserID, create_requester


def _event_dict(
    sender: str, room_id: str, event_type: str, content: dict, state_key: str | None
) -> dict[str, Any]:
    event_dict: dict[str, Any] = {
        "type": event_type,
        "room_id": room_id,
        "sender": sender,
        "content": content,
    }
    if state_key is not None:
        event_dict["state_key"] = state_key
    return event_dict


#: The room version of the histories written here (see ``Driver.create_room``).
ROOM_VERSION = "12"


class Driver:
    """Writes room histories as a client (through Synapse's handlers) would."""

    def __init__(self, hs: HomeServer) -> None:
        self.hs = hs
        self.rooms = hs.get_room_creation_handler()
        self.members = hs.get_room_member_handler()
        self.creator = hs.get_event_creation_handler()

    async def register(self, localpart: str) -> str:
        return await self.hs.get_registration_handler().register_user(
            localpart=localpart, password_hash=None
        )

    @staticmethod
    def requester(user_id: str) -> Requester:
        return create_requester(user_id)

    async def create_room(self, user_id: str, preset: str, **extra: Any) -> str:
        """A room of version 12 unless ``extra`` names another: the same rules (room
        creators hold power without a power-levels entry) on every supported Synapse,
        whose default room version is 10 in 1.157 and 12 in 1.163."""
        room_id, _, _ = await self.rooms.create_room(
            self.requester(user_id),
            {"preset": preset, "room_version": ROOM_VERSION, **extra},
            ratelimit=False,
        )
        return room_id

    async def membership(
        self, sender: str, target: str, room_id: str, action: str, **kwargs: Any
    ) -> str:
        event_id, _ = await self.members.update_membership(
            self.requester(sender),
            UserID.from_string(target),
            room_id,
            action,
            ratelimit=False,
            **kwargs,
        )
        return event_id

    async def send(
        self,
        sender: str,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        prev_event_ids: list[str] | None = None,
    ) -> EventBase:
        event, _ = await self.creator.create_and_send_nonmember_event(
            self.requester(sender),
            _event_dict(sender, room_id, event_type, content, state_key),
            prev_event_ids=prev_event_ids,
            ratelimit=False,
        )
        return event

    async def message(self, sender: str, room_id: str, body: str) -> EventBase:
        return await self.send(
            sender, room_id, EventTypes.Message, {"msgtype": "m.text", "body": body}
        )

    async def _build(
        self, sender: str, room_id: str, event_type: str, content: dict, state_key: str | None
    ) -> tuple[EventBase, EventContext]:
        event, unpersisted = await self.creator.create_event(
            self.requester(sender),
            _event_dict(sender, room_id, event_type, content, state_key),
        )
        context = await unpersisted.persist(event)
        return event, context

    async def rejected_event(
        self, sender: str, room_id: str, event_type: str, content: dict, state_key: str | None
    ) -> str:
        """Persist an event as rejected, as federation does when auth fails.

        The event is built and its context computed by Synapse; only the
        rejection is forced, which is what ``_check_event_auth`` would decide
        for an event from a server we do not trust.
        """
        event, context = await self._build(sender, room_id, event_type, content, state_key)
        context.rejected = RejectedReason.AUTH_ERROR
        persistence = self.hs.get_storage_controllers().persistence
        assert persistence is not None, "this process does not persist events"
        await persistence.persist_event(event, context)
        return event.event_id

    async def outlier_then_normal(
        self, sender: str, room_id: str, event_type: str, content: dict, state_key: str
    ) -> tuple[str, EventBase, EventContext]:
        """Persist an event as an outlier; return what is needed to de-outlier it."""
        event, context = await self._build(sender, room_id, event_type, content, state_key)
        event.internal_metadata.outlier = True
        persistence = self.hs.get_storage_controllers().persistence
        assert persistence is not None, "this process does not persist events"
        await persistence.persist_event(
            event, EventContext.for_outlier(self.hs.get_storage_controllers())
        )
        return event.event_id, event, context


@attr.s(auto_attribs=True)
class HistoryShape:
    """The size of a generated history."""

    rooms: int = 4
    big_room_members: int = 200
    small_room_members: int = 8
    events: int = 3000
    seed: int = 1
    #: Part of the random activity that goes to the big room.
    big_room_share: float = 0.4


class HistoryWriter:
    """Writes a realistic history, in parts, possibly across restarts of Synapse.

    Rooms of different sizes (room 0 is the big one) with joins, leaves,
    kicks, invites, power-level, name and topic changes, messages and forks
    (two state events on one prev event, merged by the next event through
    state resolution). Deterministic for a given seed.
    """

    def __init__(self, shape: HistoryShape, user_prefix: str = "user") -> None:
        self.shape = shape
        self.user_prefix = user_prefix
        self.rng = random.Random(shape.seed)
        self.users: list[str] = []
        self.rooms: list[str] = []
        self.members: dict[str, set[str]] = {}
        self.sent = 0

    async def create(
        self, hs: HomeServer, progress: Callable[[int], None] | None = None
    ) -> None:
        """Register the users, create the rooms and fill them (counted as events sent)."""
        shape, d = self.shape, Driver(hs)
        count = max(shape.big_room_members, shape.small_room_members) + 1
        self.users = [await d.register(f"{self.user_prefix}{i}") for i in range(count)]
        owner, others = self.users[0], self.users[1:]
        for r in range(shape.rooms):
            preset = "public_chat" if r % 2 == 0 else "private_chat"
            room_id = await d.create_room(owner, preset, name=f"Room {r}", topic="hello")
            self._tick(progress, 8)
            if preset == "private_chat":
                # Private rooms need invites; open this one up so joins work.
                await d.send(owner, room_id, EventTypes.JoinRules, {"join_rule": "public"}, "")
                self._tick(progress)
            self.rooms.append(room_id)
            self.members[room_id] = {owner}
            size = shape.big_room_members if r == 0 else shape.small_room_members
            for user in others[:size]:
                await d.membership(user, user, room_id, Membership.JOIN)
                self.members[room_id].add(user)
                self._tick(progress)

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` needs to go on writing after a restart (JSON-safe)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "shape": attr.asdict(self.shape),
            "user_prefix": self.user_prefix,
            "users": self.users,
            "rooms": self.rooms,
            "members": {room: sorted(users) for room, users in self.members.items()},
            "sent": self.sent,
            "rng": [version, list(internal), gauss],
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> "HistoryWriter":
        """A writer that goes on where the one whose :meth:`state` this is stopped."""
        writer = cls(HistoryShape(**state["shape"]), state["user_prefix"])
        writer.users = list(state["users"])
        writer.rooms = list(state["rooms"])
        writer.members = {room: set(users) for room, users in state["members"].items()}
        writer.sent = state["sent"]
        version, internal, gauss = state["rng"]
        writer.rng.setstate((version, tuple(internal), gauss))
        return writer

    def _tick(self, progress: Callable[[int], None] | None, n: int = 1) -> None:
        self.sent += n
        if progress is not None:
            progress(n)

    async def send(
        self, hs: HomeServer, until: int, progress: Callable[[int], None] | None = None
    ) -> None:
        """Send random activity until ``until`` events were sent in all."""
        d, rng = Driver(hs), self.rng
        owner, others = self.users[0], self.users[1:]
        rooms, members = self.rooms, self.members
        while self.sent < until:
            room_id = rooms[0] if rng.random() < self.shape.big_room_share else rng.choice(rooms[1:] or rooms)
            present = sorted(members[room_id] - {owner})
            roll = rng.random()
            if roll < 0.70 or not present:
                sender = rng.choice(sorted(members[room_id]))
                await d.message(sender, room_id, f"msg {self.sent}")
                self._tick(progress)
            elif roll < 0.78:
                user = rng.choice(present)
                await d.membership(user, user, room_id, Membership.LEAVE)
                members[room_id].discard(user)
                self._tick(progress)
            elif roll < 0.86:
                candidates = [u for u in others if u not in members[room_id]]
                if candidates:
                    user = rng.choice(candidates[:50])
                    await d.membership(user, user, room_id, Membership.JOIN)
                    members[room_id].add(user)
                    self._tick(progress)
            elif roll < 0.88:
                user = rng.choice(present)
                await d.membership(owner, user, room_id, "kick", content={"reason": "demo"})
                members[room_id].discard(user)
                self._tick(progress)
            elif roll < 0.93:
                kind = rng.choice([EventTypes.Name, EventTypes.Topic])
                field = "name" if kind == EventTypes.Name else "topic"
                await d.send(owner, room_id, kind, {field: f"{field} {self.sent}"}, "")
                self._tick(progress)
            elif roll < 0.96:
                promoted = {u: 50 for u in rng.sample(present, min(3, len(present)))}
                await d.send(
                    owner,
                    room_id,
                    EventTypes.PowerLevels,
                    {"users": promoted, "users_default": 0, "events_default": 0},
                    "",
                )
                self._tick(progress)
            else:
                base = await d.message(owner, room_id, f"fork base {self.sent}")
                await d.send(
                    owner, room_id, EventTypes.Topic, {"topic": f"left {self.sent}"}, "",
                    prev_event_ids=[base.event_id],
                )
                await d.send(
                    owner, room_id, EventTypes.Name, {"name": f"right {self.sent}"}, "",
                    prev_event_ids=[base.event_id],
                )
                await d.message(owner, room_id, f"merge {self.sent}")
                self._tick(progress, 4)


async def realistic_history(
    hs: HomeServer,
    shape: HistoryShape,
    progress: Callable[[int], None] | None = None,
    user_prefix: str = "user",
) -> list[str]:
    """Write a whole history (see :class:`HistoryWriter`); returns the room IDs."""
    writer = HistoryWriter(shape, user_prefix)
    await writer.create(hs, progress)
    await writer.send(hs, shape.events, progress)
    return writer.rooms
