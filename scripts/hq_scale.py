"""A history at Matrix HQ's scale, written in Synapse's own layout, then the module on it.

    python scripts/hq_scale.py --postgres "host=127.0.0.1 user=postgres" \\
        [--members 50000 --events 1000000 --rooms 20] [--data-dir DIR] [--write-only]
    python scripts/hq_scale.py --reuse --reclaim [--sample 300] --data-dir DIR

**How the history is made.** Not through Synapse's handlers (event creation,
auth checks, signing and push rules make that hours here), but through the two
storage paths every event of a real server ends in:

* every state change gets its state group from Synapse's own
  ``StateGroupDataStore.store_state_group`` (the predecessor and the delta, and
  the full state, which Synapse stores instead of a delta once a chain reaches
  ``MAX_STATE_DELTA_HOPS``, 100), exactly as after ``compute_event_context``;
* the events, built as Synapse builds them for the room version (v10: event IDs
  are reference hashes), are persisted by Synapse's own
  ``EventsPersistenceStorageController.persist_events`` with contexts holding
  those groups, batches of up to 100 events of one room, so ``events``,
  ``event_json``, ``event_edges``, ``event_auth`` and the auth chain index,
  ``event_to_state_groups``, ``current_state_events``, ``room_memberships`` and
  the stream tables are Synapse's own rows.

How it differs from a history written through the handlers: the senders are
users of another server (no local users: no push actions or device lists;
``--local-users`` local users join at the end, through the same path, so
that ``benchmarks.live`` has clients in the rooms, and ``dataset.json``
names them),
and Synapse runs without search indexing and user directory updates (see
``writer_config``), none of which has anything to do with state; events are not signed and
their ``hashes`` are not content hashes (nothing in storage checks them); the
DAG is linear in each room (no forks, so no state resolution: every group is a
delta on the one before); the batch's last state event carries the delta from
the group before the batch to its own, as Synapse's handlers give one event at
a time, so that persisting a batch never reads a whole state; ``ANALYZE``
runs at 5,000 events and each doubling (see ``write_history``). The state is
what a big public room has: a create event, power levels, join rules, history
visibility, a topic now and then, and members joining (most), leaving and
rejoining; every message comes from a joined member.

Then, with the module (mode serve): ``migrate`` killed with SIGKILL half-way
and rerun (events/s, peak RSS of each process), ``stats``, the lookups of the
runner (cold and warm, native against NID, answers compared first) on the big
room's ``--lookup-events`` most recent events and as many of its latest state
groups, and ``verify --sample 10000``.
With ``--reuse --reclaim`` instead: the rest of the migration, then reclaim
and restore as ``migration_at_scale.reclaim_phase`` does them (the biggest
room first and its rate, SIGKILL half-way through each, the footprint after
``VACUUM FULL``, Synapse's answers on ``--sample`` events and groups compared
by Synapse alone before and after, and with the module while reclaimed).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml
from migration_at_scale import (
    cli,
    count,
    load_homeserver,
    migrated,
    reclaim_phase,
    run_measured,
)

from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.commands.ui import WorkProgress
from synapse_nidstate.demo.inprocess import (
    homeserver_config,
    postgres_database,
    start_homeserver,
    stop_homeserver,
)

#: Events persisted in one call (Synapse's persistence queue writes up to 100
#: events of a room in one transaction).
BATCH = 100
REMOTE = "hq.example"
#: ``--local-users`` joined to the big room, then to the small rooms, one each
#: (``benchmarks.live``'s senders: six in the big room, one in each of four
#: small rooms).
LIVE_BIG_ROOM = 6
LIVE_SMALL_ROOMS = 4


def writer_config(data_dir: str, database: dict, module: dict | None = None) -> dict:
    """Synapse's configuration while the history is written: no search index
    (``enable_search: false``, as many operators run) and no user directory
    on this process (``update_user_directory_from_worker`` names another):
    neither has anything to do with state, and they would double the time.
    The module's steps keep both off (``module`` its configuration): with the
    user directory on, every process started on this history would spend its
    time indexing the 1,000,000 events' memberships the writer skipped."""
    config = homeserver_config(data_dir, database, module)
    config["enable_search"] = False
    config["update_user_directory_from_worker"] = "nidstate-hq-no-such-worker"
    return config


def create_database(dsn: str, name: str) -> str:
    """A fresh database with C collation (what Synapse requires); its DSN."""
    import psycopg2

    conn = psycopg2.connect(dsn + " dbname=postgres")
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    cur.execute(
        f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        " TEMPLATE template0"
    )
    # A bulk load's usual setting, for this database only: a commit does not
    # wait for its WAL flush (a crash loses the last moments, never consistency).
    # It changes how fast the rows are written, not which rows.
    cur.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    conn.close()
    return f"{dsn} dbname={name}"


class _Untagged(dict):
    """A room's state as ``store_state_group`` is given it, with a short repr:
    with ``opentracing`` installed (the dev extra installs it), Synapse's
    ``@tag_args`` makes ``str()`` of every argument, and for a state of tens of
    thousands of entries at every state event that took half the writer's time
    (py-spy), writing slower as the big room grew."""

    def __repr__(self) -> str:
        return f"<state: {len(self):,} entries>"


class RoomWriter:
    """One room's linear history: its state, its latest event, its depth."""

    def __init__(self, hs: Any, room_id: str, creator: str) -> None:
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

        self.hs = hs
        self.room_id = room_id
        self.creator = creator
        self.version = KNOWN_ROOM_VERSIONS["10"]
        self.state: dict[tuple[str, str], str] = _Untagged()
        self.group: int | None = None
        self.latest: str | None = None
        self.depth = 0
        self.joined: list[str] = []
        self.left: list[str] = []
        self.batch: list[tuple[Any, Any]] = []
        #: The group before the batch's first event, and what the batch changed.
        self.batch_start_group: int | None = None
        self.changed: dict[tuple[str, str], str] = {}

    def _event(self, event_type: str, sender: str, content: dict, state_key: str | None) -> Any:
        from synapse.events import make_event_from_dict

        auth = [
            self.state[k]
            for k in (
                ("m.room.create", ""),
                ("m.room.power_levels", ""),
                ("m.room.join_rules", ""),
                ("m.room.member", sender),
            )
            if k in self.state
        ]
        self.depth += 1
        event_dict: dict[str, Any] = {
            "room_id": self.room_id,
            "type": event_type,
            "sender": sender,
            "content": content,
            "prev_events": [self.latest] if self.latest else [],
            "auth_events": auth,
            "depth": self.depth,
            "origin_server_ts": 1_700_000_000_000 + self.depth,
            "hashes": {"sha256": "unchecked"},
            "signatures": {},
        }
        if state_key is not None:
            event_dict["state_key"] = state_key
        event = make_event_from_dict(event_dict, self.version)
        self.latest = event.event_id
        return event

    async def add(
        self, event_type: str, sender: str, content: dict, state_key: str | None = None
    ) -> None:
        from synapse.events.snapshot import EventContext

        storage = self.hs.get_storage_controllers()
        event = self._event(event_type, sender, content, state_key)
        before = self.group
        if not self.batch:
            self.batch_start_group = before
        if state_key is None:
            context = EventContext.with_state(storage, before, before, None, False, {})
        else:
            key = (event_type, state_key)
            delta = {key: event.event_id}
            self.state[key] = event.event_id
            self.changed[key] = event.event_id
            group = await self.hs.get_datastores().state.store_state_group(
                event.event_id, self.room_id, before, delta if before else None, self.state
            )
            deltas = {(before, group): delta} if before is not None else {}
            start = self.batch_start_group
            if start is not None and start != before:
                # The whole batch's change, as one delta (see the docstring).
                deltas[(start, group)] = dict(self.changed)
            context = EventContext.with_state(storage, group, before, delta, False, deltas)
            self.group = group
        self.batch.append((event, context))
        if len(self.batch) >= BATCH:
            await self.flush()

    async def flush(self) -> None:
        """Persist the batch through Synapse's persistence queue for the room
        (100 events a transaction, so each transaction is one batch and its
        last state event's delta hint covers it)."""
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        self.batch_start_group = None
        self.changed = {}
        await self.hs.get_storage_controllers().persistence.persist_events(batch)


async def write_history(
    hs: Any, members: int, events: int, rooms: int, seed: int, local_users: int = 0
) -> dict:
    """The big room and ``rooms - 1`` small ones; returns what was written.

    Then ``local_users`` users of this server, registered (no password: an
    admin logs in as them) and joined at the end of the history: the first
    ``LIVE_BIG_ROOM`` to the big room, the next ones one to each small room in
    turn while there are ``LIVE_SMALL_ROOMS`` of them, the rest to no room
    (``benchmarks.live`` has them join and leave)."""
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

    rng = random.Random(seed)
    store = hs.get_datastores().main
    writers = []
    for i in range(rooms):
        room_id = f"!room{i}:{REMOTE}"
        creator = f"@creator{i}:{REMOTE}"
        await store.store_room(room_id, creator, True, KNOWN_ROOM_VERSIONS["10"])
        w = RoomWriter(hs, room_id, creator)
        await w.add("m.room.create", creator, {"creator": creator, "room_version": "10"}, "")
        await w.add("m.room.member", creator, {"membership": "join"}, creator)
        w.joined.append(creator)
        await w.add("m.room.power_levels", creator, {"users": {creator: 100}}, "")
        await w.add("m.room.join_rules", creator, {"join_rule": "public"}, "")
        await w.add("m.room.history_visibility", creator, {"history_visibility": "shared"}, "")
        writers.append(w)
    big = writers[0]
    # The big room takes 80% of the events; its members join through the
    # first 60% of them, so that messages come from a growing room.
    big_events = int(events * 0.8)
    small_events = events - big_events
    progress = WorkProgress("writing", events)
    reported = 0
    next_member = 1
    join_every = max(1, int(big_events * 0.6) // members)

    async def one_big(i: int) -> None:
        nonlocal next_member
        roll = rng.random()
        if next_member <= members and i % join_every == 0:
            user = f"@u{next_member}:{REMOTE}"
            next_member += 1
            await big.add("m.room.member", user, {"membership": "join"}, user)
            big.joined.append(user)
        elif roll < 0.004 and len(big.joined) > 10:
            user = big.joined.pop(rng.randrange(1, len(big.joined)))
            await big.add("m.room.member", user, {"membership": "leave"}, user)
            big.left.append(user)
        elif roll < 0.006 and big.left:
            user = big.left.pop(rng.randrange(len(big.left)))
            await big.add("m.room.member", user, {"membership": "join"}, user)
            big.joined.append(user)
        elif roll < 0.0062:
            await big.add("m.room.topic", big.creator, {"topic": f"topic {i}"}, "")
        else:
            sender = rng.choice(big.joined)
            await big.add("m.room.message", sender, {"msgtype": "m.text", "body": f"m{i}"})

    async def one_small(i: int) -> None:
        w = writers[1 + i % (len(writers) - 1)]
        if len(w.joined) < 10 and rng.random() < 0.2:
            user = f"@s{w.room_id[5:].split(':')[0]}_{len(w.joined)}:{REMOTE}"
            await w.add("m.room.member", user, {"membership": "join"}, user)
            w.joined.append(user)
        else:
            sender = rng.choice(w.joined)
            await w.add("m.room.message", sender, {"msgtype": "m.text", "body": f"s{i}"})

    started = time.monotonic()
    small_done = 0
    next_analyze = 5000
    for i in range(big_events):
        await one_big(i)
        # The small rooms' events interleaved, in proportion.
        while len(writers) > 1 and small_done < small_events * (i + 1) // big_events:
            await one_small(small_done)
            small_done += 1
        if i % 1000 == 999:
            total = sum(w.depth for w in writers)
            progress(total - reported)
            reported = total
            if total >= next_analyze:
                # Fresh planner statistics, as autovacuum keeps them on a live
                # server (it may be off, as on this machine): without them the
                # planner keeps the plans of an empty database, and Synapse's
                # hop count of a delta chain scans all of state_group_edges.
                await store.db_pool.runInteraction(
                    "hq_analyze", lambda txn: txn.execute("ANALYZE")
                )
                next_analyze *= 2
    local = [f"@live{k}:{hs.hostname}" for k in range(local_users)]
    for k, user in enumerate(local):
        await store.register_user(user)
        if k < LIVE_BIG_ROOM:
            w = big
        elif k < LIVE_BIG_ROOM + LIVE_SMALL_ROOMS and len(writers) > 1:
            w = writers[1 + (k - LIVE_BIG_ROOM) % (len(writers) - 1)]
        else:
            continue
        await w.add("m.room.member", user, {"membership": "join"}, user)
        w.joined.append(user)
    for w in writers:
        await w.flush()
    progress.finish()
    joined_local = sum(1 for w in writers for u in w.joined if u in local)
    return {
        "events": big_events + small_events + 5 * rooms + joined_local,
        "room_ids": [w.room_id for w in writers],
        "local_users": local,
        "rooms": rooms,
        "big_room_members_joined": len(big.joined),
        "big_room_state": len(big.state),
        "seconds": time.monotonic() - started,
    }


def lookups_main(config_path: str, events: int) -> int:
    """``--lookups``: the runner's lookups on the big room's ``events`` most
    recent events, native against NID, cold then warm, then the reads of
    as many of its latest state groups (``time_group_reads``); answers
    compared first."""

    from synapse_nidstate.commands.verify import (
        compare_with_native,
        latest_room_events_with_state,
        standard_filters,
    )
    from synapse_nidstate.demo.timing import (
        TIMING_HEADER,
        format_timings,
        time_group_reads,
        time_lookups,
    )
    from synapse_nidstate.runtime.module import module_for

    config_dict, data_dir = load_homeserver(config_path, "lookups.log")

    async def run() -> None:
        hs = await start_homeserver(config_dict, data_dir)
        try:
            module = module_for(hs)
            assert module is not None

            event_ids = await latest_room_events_with_state(hs, f"!room0:{REMOTE}", events)
            fetched = await hs.get_datastores().main.get_events(event_ids)
            senders = sorted({e.sender for e in fetched.values()})
            compared = await compare_with_native(
                module.lookups, event_ids, standard_filters(senders[:3])
            )
            print(f"lookups: {compared.comparisons:,} answers compared on {len(event_ids)} "
                  f"events, {len(compared.mismatches)} mismatches, {compared.unmirrored} "
                  "not mirrored")
            timings = []
            for cold in (True, False):
                timings += await time_lookups(
                    hs, module.lookups, event_ids, senders[0], senders[1:], cold=cold
                )
            # The big room's latest state groups, as many as events (those
            # of the events alone are a few: most events are messages, which
            # share their group; and a handful of reads would be timed with
            # each connection's first use of a statement in them).
            groups = await hs.get_datastores().main.db_pool.simple_select_onecol(
                "state_groups", {"room_id": f"!room0:{REMOTE}"}, "id", "nidstate_hq_groups"
            )
            groups = sorted(groups)[-events:]
            mirrored = await module.store.known_groups(groups)
            print(f"state groups: the room's latest {len(groups)}, {len(mirrored)} mirrored")
            groups = [g for g in groups if g in mirrored]
            for cold in (True, False):
                timings += await time_group_reads(
                    hs, module.lookups, groups, senders[0], senders[1:], cold=cold
                )
            print("| " + " | ".join(TIMING_HEADER) + " |")
            print("|" + "---|" * len(TIMING_HEADER))
            for row in format_timings(timings):
                print("| " + " | ".join(row) + " |")
        finally:
            await stop_homeserver(hs)

    run_in_reactor(run)
    return 0


def module_phase(data_dir: str, database: dict, written: int, lookup_events: int) -> int:
    config_path = os.path.join(data_dir, "homeserver.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(writer_config(data_dir, database, {"mode": "serve"}), f)
    half = written // 2
    out, seconds, rss, killed = run_measured(
        ["migrate", "-c", config_path, "--no-progress"], lambda: migrated(database) >= half
    )
    done = migrated(database)
    print(f"migrate: {'killed with SIGKILL' if killed else 'finished'} after {seconds:.0f}s at "
          f"{done:,} events answered; peak RSS {rss / 1024:.0f} MiB; {out[-300:]}", flush=True)
    out, seconds, rss, _ = run_measured(["migrate", "-c", config_path, "--no-progress"])
    print(f"migrate rerun: {seconds:.0f}s, peak RSS {rss / 1024:.0f} MiB: {out[-400:]}", flush=True)
    stats = cli("stats", "-c", config_path, "--top", "3")
    print(stats.stdout.strip(), flush=True)
    lookups = subprocess.run(
        [sys.executable, __file__, "--lookups", config_path, "--lookup-events", str(lookup_events)],
        capture_output=True,
        text=True,
    )
    print(lookups.stdout.strip() or lookups.stderr[-2000:], flush=True)
    # Last: on a big history it is the longest step (Synapse's side reads
    # every sampled event's state cold).
    out, seconds, rss, _ = run_measured(
        ["verify", "-c", config_path, "--no-progress", "--sample", "10000"]
    )
    print(f"verify --sample 10000 ({seconds:.0f}s, peak RSS {rss / 1024:.0f} MiB):\n{out[-1500:]}")
    verified = "mismatches: 0" in out
    print(f"data: {data_dir}; config: {config_path}")
    return 0 if verified and lookups.returncode == 0 else 1


def reclaim_at_scale(data_dir: str, database: dict, sample: int, verify_sample: int) -> int:
    """``--reuse --reclaim``: migrate what is left, then migration_at_scale's
    reclaim phase (the biggest room first, kills, restore, digests of
    ``sample`` events and groups by Synapse alone and with the module)."""
    config_path = os.path.join(data_dir, "homeserver.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(writer_config(data_dir, database, {"mode": "serve"}), f)
    out, seconds, rss, _ = run_measured(["migrate", "-c", config_path, "--no-progress"])
    print(f"migrate: {seconds:.0f}s, peak RSS {rss / 1024:.0f} MiB: {out[-300:]}", flush=True)
    return reclaim_phase(data_dir, database, config_path, sample, verify_sample)


def time_transactions() -> dict[str, list[float]]:
    """From now on, the wall time of every Synapse transaction by its name
    (``DatabasePool.new_transaction`` wrapped; for ``--transactions``)."""
    from synapse.storage.database import DatabasePool

    timed: dict[str, list[float]] = {}
    new_transaction = DatabasePool.new_transaction

    def timing(self: Any, conn: Any, desc: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return new_transaction(self, conn, desc, *args, **kwargs)
        finally:
            timed.setdefault(desc, []).append(time.perf_counter() - started)

    DatabasePool.new_transaction = timing  # type: ignore[method-assign]
    return timed


def describe(database: dict) -> int:
    """What the database holds, read directly; returns the events with a state group."""
    rows = count(database, "SELECT COUNT(*) FROM state_groups_state")
    groups = count(database, "SELECT COUNT(*) FROM state_groups")
    events = count(database, "SELECT COUNT(*) FROM events")
    with_state = count(database, "SELECT COUNT(*) FROM event_to_state_groups")
    members = count(
        database,
        "SELECT COUNT(*) FROM current_state_events WHERE room_id = '!room0:hq.example'"
        " AND type = 'm.room.member' AND membership = 'join'",
    )
    print(f"history: {events:,} events ({with_state:,} with a state group); the big room "
          f"{members:,} joined members; {groups:,} state groups, {rows:,} state_groups_state rows")
    return with_state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", metavar="DSN", default="host=127.0.0.1 user=postgres",
                        help="libpq DSN of the server, without dbname")
    parser.add_argument("--database-name", default="nidstate_hq")
    parser.add_argument("--members", type=int, default=50000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", help="where the configuration and logs go")
    parser.add_argument(
        "--local-users", type=int, default=12,
        help="users of this server joined at the end of the history, for benchmarks.live "
        f"(the first {LIVE_BIG_ROOM} to the big room, {LIVE_SMALL_ROOMS} to small rooms; "
        "default 12)",
    )
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument(
        "--transactions", action="store_true",
        help="print the time Synapse's transactions took while writing, by name",
    )
    parser.add_argument(
        "--reuse", action="store_true",
        help="keep the database a run wrote (or was interrupted writing) and go on with the module",
    )
    parser.add_argument(
        "--reclaim", action="store_true",
        help="with --reuse: migrate what is left, then reclaim and restore (each killed "
        "half-way), instead of the lookups and verify",
    )
    parser.add_argument(
        "--sample", type=int, default=300,
        help="with --reclaim: events and groups Synapse's answers are compared on (default 300)",
    )
    parser.add_argument(
        "--verify-sample", type=int, default=10000,
        help="with --reclaim: events `verify --sample` compares while the groups are "
        "reclaimed (default 10000; 0: none)",
    )
    parser.add_argument("--lookups", metavar="HOMESERVER_YAML", help=argparse.SUPPRESS)
    parser.add_argument(
        "--lookup-events", type=int, default=500,
        help="how many of the big room's latest events the lookups time (default 500)",
    )
    args = parser.parse_args()
    if args.lookups:
        return lookups_main(args.lookups, args.lookup_events)

    import logging

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="nidstate-hq-")
    os.makedirs(data_dir, exist_ok=True)
    logging.basicConfig(filename=os.path.join(data_dir, "homeserver.log"), level=logging.WARNING)
    if args.reuse:
        database = postgres_database(f"{args.postgres} dbname={args.database_name}")
        describe(database)
        if args.reclaim:
            return reclaim_at_scale(data_dir, database, args.sample, args.verify_sample)
        return module_phase(
            data_dir,
            database,
            count(database, "SELECT COUNT(*) FROM event_to_state_groups"),
            args.lookup_events,
        )
    dsn = create_database(args.postgres, args.database_name)
    database = postgres_database(dsn)

    async def write() -> dict:
        hs = await start_homeserver(writer_config(data_dir, database), data_dir)
        try:
            return await write_history(
                hs, args.members, args.events, args.rooms, args.seed, args.local_users
            )
        finally:
            await stop_homeserver(hs)

    timed = time_transactions() if args.transactions else {}
    written = run_in_reactor(write)
    for name, seconds in sorted(timed.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"  {sum(seconds):7.1f}s {len(seconds):7,} x {sum(seconds) / len(seconds) * 1000:6.1f} ms"
              f"  {name}")
    print(f"written: {written['events']:,} events in {written['rooms']} rooms in "
          f"{written['seconds']:.0f}s ({written['events'] / written['seconds']:,.0f} events/s)")
    with_state = describe(database)
    if args.write_only:
        # The configuration the module's commands (and cost_curve.py) take.
        config_path = os.path.join(data_dir, "homeserver.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(writer_config(data_dir, database, {"mode": "serve"}), f)
        # What benchmarks.live --dataset reads: the database, the rooms (the
        # big one first) and the users it may log in as (the first is left out
        # as the rooms' owner, as in the runner's datasets: here the big room's
        # remote creator).
        with open(os.path.join(data_dir, "dataset.json"), "w") as f:
            json.dump({
                "database": args.database_name,
                # writer_config's settings, for every process run on this history.
                "homeserver_overrides": {
                    key: value for key, value in writer_config(data_dir, database).items()
                    if key in ("enable_search", "update_user_directory_from_worker")
                },
                "writer": {
                    "rooms": written["room_ids"],
                    "users": [f"@creator0:{REMOTE}", *written["local_users"]],
                },
            }, f, indent=2)
        print(f"data: {data_dir}; database: {dsn}; homeserver.yaml (module in mode serve): "
              f"{config_path}")
        return 0
    return module_phase(data_dir, database, with_state, args.lookup_events)


if __name__ == "__main__":
    sys.exit(main())
