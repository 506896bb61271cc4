"""Random room DAGs written through Synapse, mirror against native for every event.

Hypothesis draws sequences of operations (messages, state changes, membership
churn including kicks, bans and unbans, forks merged by state resolution,
forks where one branch demotes the sender of the other branch's state event,
so that resolution resets that state, and rejected events); each sequence is
played through Synapse's own handlers into a fresh room, and the mirror's
answer must equal Synapse's for every event and every filter of
``filters_for``, and for every state group (its state with every filter, its
delta) as Synapse reads them.

The examples are drawn first (``derandomize=True``: the same ones on every
run, no example database) and played afterwards, because Synapse's handlers
are asynchronous on the reactor that runs the test; a failure names the
example's operations, which can be replayed as they are.
"""

from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from synapse.api.constants import EventTypes, Membership

from synapse_nidstate.demo.history import Driver
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import compare_every_delta, compare_every_group, compare_room, filters_for

#: Examples per engine: each is a room of up to ~60 events through Synapse.
EXAMPLES = 16

OWNER, ADMIN = 0, 1
MEMBERS = range(2, 6)
STATE_TYPES = [EventTypes.Name, EventTypes.Topic, "org.example.state"]

state_change = st.tuples(
    st.sampled_from(STATE_TYPES), st.sampled_from(["", "a", "b"]), st.sampled_from([OWNER, ADMIN])
)
operation = st.one_of(
    st.tuples(st.just("message"), st.integers(0, 5)),
    st.tuples(st.just("state"), state_change),
    st.tuples(
        st.just("membership"),
        st.sampled_from(["join", "leave", "kick", "ban", "unban", "invite"]),
        st.sampled_from(list(MEMBERS)),
    ),
    st.tuples(st.just("fork"), state_change, state_change),
    st.tuples(st.just("reset"), state_change),
    st.tuples(st.just("promote"),),
    st.tuples(st.just("rejected"), state_change),
)


def draw_examples() -> list[list[tuple[Any, ...]]]:
    examples: list[list[tuple[Any, ...]]] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
    )
    @given(st.lists(operation, min_size=8, max_size=25))
    def collect(operations: list[tuple[Any, ...]]) -> None:
        examples.append(operations)

    collect()
    return examples


class Room:
    """Plays operations into one room, keeping what Synapse would allow."""

    def __init__(self, driver: Driver, users: list[str], room_id: str) -> None:
        self.d = driver
        self.users = users
        self.room_id = room_id
        self.joined = {users[OWNER], users[ADMIN]}
        self.banned: set[str] = set()
        self.invited: set[str] = set()
        self.admin_powerful = True

    def sender(self, who: int) -> str:
        if who == ADMIN and not self.admin_powerful:
            return self.users[OWNER]
        return self.users[who]

    async def state(self, change: tuple[str, str, int], prev: list[str] | None = None) -> None:
        event_type, key, who = change
        content = {"name": "n"} if event_type == EventTypes.Name else {"topic": "t", "v": key}
        state_key = "" if event_type != "org.example.state" else key
        await self.d.send(self.sender(who), self.room_id, event_type, content, state_key, prev)

    async def power(self, admin_level: int, prev: list[str] | None = None) -> None:
        await self.d.send(
            self.users[OWNER],
            self.room_id,
            EventTypes.PowerLevels,
            {"users": {self.users[ADMIN]: admin_level}, "users_default": 0,
             "events_default": 0, "state_default": 50},
            "",
            prev,
        )

    async def play(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        owner = self.users[OWNER]
        if kind == "message":
            sender = self.users[op[1]]
            if sender in self.joined:
                await self.d.message(sender, self.room_id, "hello")
        elif kind == "state":
            await self.state(op[1])
        elif kind == "membership":
            action, target = op[1], self.users[op[2]]
            if action == "join" and target not in self.joined | self.banned:
                await self.d.membership(target, target, self.room_id, Membership.JOIN)
                self.joined.add(target)
                self.invited.discard(target)
            elif action == "leave" and target in self.joined:
                await self.d.membership(target, target, self.room_id, Membership.LEAVE)
                self.joined.discard(target)
            elif action == "kick" and target in self.joined:
                await self.d.membership(owner, target, self.room_id, "kick")
                self.joined.discard(target)
            elif action == "ban" and target not in self.banned:
                await self.d.membership(owner, target, self.room_id, Membership.BAN)
                self.joined.discard(target)
                self.invited.discard(target)
                self.banned.add(target)
            elif action == "unban" and target in self.banned:
                await self.d.membership(owner, target, self.room_id, "unban")
                self.banned.discard(target)
            elif action == "invite" and target not in self.joined | self.banned | self.invited:
                await self.d.membership(owner, target, self.room_id, Membership.INVITE)
                self.invited.add(target)
        elif kind == "fork":
            # Two state events on one prev event; the next event merges them
            # and Synapse resolves the two states.
            base = await self.d.message(owner, self.room_id, "fork")
            await self.state(op[1], [base.event_id])
            await self.state(op[2], [base.event_id])
            await self.d.message(owner, self.room_id, "merge")
        elif kind == "reset":
            # One branch: the admin changes state. The other: the owner
            # demotes the admin. Resolution applies the power levels first, so
            # the admin's change is dropped: that state is reset.
            base = await self.d.message(owner, self.room_id, "reset")
            if self.admin_powerful:
                event_type, key, _ = op[1]
                await self.state((event_type, key, ADMIN), [base.event_id])
            await self.power(0, [base.event_id])
            self.admin_powerful = False
            await self.d.message(owner, self.room_id, "merge")
        elif kind == "promote":
            await self.power(100)
            self.admin_powerful = True
        elif kind == "rejected":
            event_type, key, _ = op[1]
            # A state event from a member without the power to send it,
            # persisted as rejected the way federation does.
            sender = next(iter(sorted(self.joined - {owner, self.users[ADMIN]})), None)
            if sender is not None:
                state_key = "" if event_type != "org.example.state" else key
                await self.d.rejected_event(
                    sender, self.room_id, event_type, {"topic": "x", "name": "x"}, state_key
                )


class RandomDagTests:
    @in_logcontext
    async def test_random_dags(self) -> None:
        hs = await self.make_homeserver({"mode": "shadow"})
        d = Driver(hs)
        users = [await d.register(f"u{i}") for i in range(6)]
        filters = filters_for(hs, users[1:])
        compared = 0
        for number, operations in enumerate(draw_examples()):
            room_id = await d.create_room(users[OWNER], "public_chat")
            room = Room(d, users, room_id)
            for user in users[ADMIN:4]:  # the admin and two members to start with
                await d.membership(user, user, room_id, Membership.JOIN)
                room.joined.add(user)
            await room.power(100)
            for op in operations:
                await room.play(op)
            try:
                compared += await compare_room(self, hs, room_id, filters)
            except AssertionError as e:
                raise AssertionError(f"example {number}, operations {operations}: {e}") from e
        self.assertGreater(compared, EXAMPLES * len(filters) * 10)
        stats = self.module(hs).stats
        # Every state group of every example, read and its delta read through the
        # module (shadow: compared with Synapse's answer, which is returned).
        before = stats.group_reads.compared
        await compare_every_group(self, hs, filters)
        groups = await compare_every_delta(self, hs)
        self.assertGreater(stats.group_reads.compared - before, groups * len(filters) // 2)
        self.assertEqual(stats.group_reads.mismatched, 0)
        self.assertEqual(stats.mirror.unprepared, 0)
        self.assertEqual(stats.mirror.write_failures, 0)


class SqliteRandomDagTests(RandomDagTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresRandomDagTests(RandomDagTests, HomeserverTestCase):
    engine = "postgres"
