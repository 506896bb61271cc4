"""The at-scale acceptance run: migrate (killed with SIGKILL half-way, then
rerun) and verify on a database a real Synapse wrote with the module off; with
``--reclaim``, then reclaim and restore, each killed half-way and rerun.

    python scripts/migration_at_scale.py --events 50000 --rooms 20 --big-room-members 5000
    python scripts/migration_at_scale.py ... --postgres "host=127.0.0.1 user=postgres dbname=X"
    python scripts/migration_at_scale.py ... --reclaim [--data-dir DIR]

Writes the history through Synapse's own handlers (slow: Synapse's own event
creation is the bound), then runs the real `synapse-nidstate` commands as
processes and prints what they printed. ``--data-dir`` reuses the directory an
earlier run printed (history written and migrated) and goes on from there.

The reclaim phase: a digest of Synapse's answer at every event and for every
state group, by Synapse alone (no module); ``reclaim`` killed half-way and
rerun; the digest again with the module (it must be equal); ``restore`` killed
half-way and rerun; the digest by Synapse alone again (equal). Each digest is
a process of its own (``--digest``: one reactor run per process). Rows and
bytes of Synapse's state tables and of the module's (``stats --json``) are
printed before, after reclaim (and after VACUUM) and after restore.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml

from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.commands.ui import WorkProgress
from synapse_nidstate.demo.history import HistoryShape, HistoryWriter
from synapse_nidstate.demo.inprocess import (
    homeserver_config,
    postgres_database,
    sqlite_database,
    start_homeserver,
    stop_homeserver,
)
from synapse_nidstate.demo.port import port_sqlite_to_postgres


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synapse_nidstate.cli", *args], capture_output=True, text=True
    )


def migrated(database: dict) -> int:
    """Events whose state group has a snapshot, read directly from the database."""
    try:
        return count(
            database,
            "SELECT COUNT(*) FROM event_to_state_groups AS esg"
            " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group",
        )
    except Exception:
        return 0  # the tables do not exist yet


def connect(database: dict, **kwargs: Any):  # type: ignore[no-untyped-def]
    """A DB-API connection to the database of a homeserver.yaml's ``database``."""
    if database["name"] == "sqlite3":
        import sqlite3

        return sqlite3.connect(database["args"]["database"], timeout=60, **kwargs)
    import psycopg2

    a = database["args"]
    return psycopg2.connect(
        host=a.get("host"), port=a.get("port"), user=a.get("user"), dbname=a["database"]
    )


def count(database: dict, sql: str) -> int:
    """One number from the database, read directly."""
    conn = connect(database)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return int(cur.fetchone()[0])
    finally:
        conn.close()


def vacuum(database: dict) -> None:
    """What an operator runs to give the space back to the operating system."""
    if database["name"] == "sqlite3":
        conn = connect(database, isolation_level=None)
        conn.execute("VACUUM")
    else:
        conn = connect(database)
        conn.autocommit = True
        conn.cursor().execute("VACUUM FULL state_groups_state")
    conn.close()


def load_homeserver(config_path: str, log_name: str) -> tuple[dict, str]:
    """A homeserver.yaml as a dict, and its directory, where ``log_name`` gets
    the warnings of a process that starts the homeserver in-process."""
    import logging

    with open(config_path) as f:
        config_dict = yaml.safe_load(f)
    data_dir = os.path.dirname(os.path.abspath(config_path))
    logging.basicConfig(filename=os.path.join(data_dir, log_name), level=logging.WARNING)
    return config_dict, data_dir


def digest_main(config_path: str, out: str, sample: int | None = None) -> int:
    """``--digest``: Synapse's answer at every event with state and for every
    state group (with ``sample``: that many of each, the same ones every time),
    as a SHA-256 each, through whatever homeserver.yaml loads."""
    import hashlib
    import json
    import random

    from synapse.types.state import StateFilter

    config_dict, data_dir = load_homeserver(config_path, "digest.log")

    def digest_of(state: dict) -> str:
        return hashlib.sha256(json.dumps(sorted(state.items())).encode()).hexdigest()

    async def run() -> dict:
        hs = await start_homeserver(config_dict, data_dir)
        try:
            main_pool = hs.get_datastores().main.db_pool
            events = await main_pool.simple_select_onecol(
                "event_to_state_groups", None, "event_id", desc="nidstate_digest_events"
            )
            groups = await hs.get_datastores().state.db_pool.simple_select_onecol(
                "state_groups", None, "id", desc="nidstate_digest_groups"
            )
            if sample is not None:
                events = random.Random(7).sample(sorted(events), min(sample, len(events)))
                groups = random.Random(7).sample(sorted(groups), min(sample, len(groups)))
            controller = hs.get_storage_controllers().state
            state_store = hs.get_datastores().state
            answer: dict = {"events": {}, "groups": {}}
            progress = WorkProgress("digest", len(events) + len(groups))
            events.sort()
            step = 100 if sample is None else 10  # big rooms' states: bounded memory
            for i in range(0, len(events), step):
                batch = events[i : i + step]
                for event_id, state in (await controller.get_state_ids_for_events(batch)).items():
                    answer["events"][event_id] = digest_of(dict(state))
                progress(len(batch))
            groups.sort()
            for i in range(0, len(groups), step):
                batch = groups[i : i + step]
                states = await state_store._get_state_for_groups(batch, StateFilter.all())
                for group in batch:
                    answer["groups"][str(group)] = digest_of(dict(states[group]))
                state_store._state_group_cache.invalidate_all()
                state_store._state_group_members_cache.invalidate_all()
                progress(len(batch))
            progress.finish()
            return answer
        finally:
            await stop_homeserver(hs)

    answer = run_in_reactor(run)
    with open(out, "w") as f:
        json.dump(answer, f)
    return 0


def run_measured(args: list[str], kill_when: Any = None) -> tuple[str, float, int, bool]:
    """Run a CLI command; (output, seconds, peak RSS KiB, killed).

    The peak RSS is the kernel's own figure for that child, from ``os.wait4``;
    the output goes to a file, so a chatty child never blocks on a full pipe."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "synapse_nidstate.cli", *args],
            stdout=out, stderr=subprocess.STDOUT,
        )
        killed = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.2)
            if not killed and kill_when is not None and kill_when():
                # os.kill, not Popen.send_signal: that polls first and may reap
                # a child that just finished, leaving wait4 nothing to report.
                os.kill(process.pid, signal.SIGKILL)
                killed = True
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return out.read().strip(), time.monotonic() - started, usage.ru_maxrss, killed


def stats_json(config_path: str) -> dict:
    import json

    result = cli("stats", "-c", config_path, "--json", "--top", "0")
    return json.loads(result.stdout)


def kill_half_way(args: list[str], database: dict, sql: str, target: int, what: str) -> None:
    """Run a command; SIGKILL it once ``sql`` reaches ``target``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "synapse_nidstate.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while process.poll() is None:
        time.sleep(0.2)
        try:
            if count(database, sql) >= target:
                process.send_signal(signal.SIGKILL)
                process.wait()
                print(f"{what} killed with SIGKILL at {count(database, sql)} (target {target})")
                return
        except Exception:
            pass  # locked: try again
    print(f"{what} finished before the kill; rerun with more groups")


def reclaim_phase(
    data_dir: str,
    database: dict,
    config_path: str,
    sample: int | None = None,
    verify_sample: int | None = None,
) -> int:
    """Digests by Synapse alone; reclaim of the room with the most groups
    (killed with SIGKILL half-way, rerun: its rate), then of the rest; digests
    with the module; ``verify --sample verify_sample`` while the groups are
    reclaimed (its time and peak RSS); restore (killed half-way, rerun);
    digests by Synapse alone. ``sample``: the digests cover that many events
    and groups (at Matrix HQ's scale a state is tens of thousands of entries)."""
    import json

    bare_path = os.path.join(data_dir, "homeserver-without-module.yaml")
    with open(config_path) as f:
        bare = {k: v for k, v in yaml.safe_load(f).items() if k != "modules"}
    with open(bare_path, "w") as f:
        yaml.safe_dump(bare, f)

    def digest(config: str, name: str) -> dict:
        out = os.path.join(data_dir, f"digest-{name}.json")
        started = time.monotonic()
        subprocess.run(
            [sys.executable, __file__, "--digest", config, "--out", out,
             *(["--sample", str(sample)] if sample else [])],
            check=True,
        )
        with open(out) as f:
            answer = json.load(f)
        print(
            f"digest {name}: {len(answer['events'])} events, {len(answer['groups'])} "
            f"state groups in {time.monotonic() - started:.0f}s", flush=True
        )
        return answer

    def figures(name: str) -> dict:
        report = stats_json(config_path)
        synapse, module = report["synapse"], report["nidstate"]
        line = {
            "state_groups_state rows": synapse["tables"]["state_groups_state"]["rows"],
            "Synapse state tables bytes": synapse["total_bytes"],
            "module tables bytes": module["total_bytes"],
        }
        print(f"{name}: {line}", flush=True)
        return line

    def measured(what: str, args: list[str], kill_when: Any = None) -> float:
        """The command's own time for its work (it prints it), else the process's."""
        out, seconds, rss, killed = run_measured(args, kill_when)
        state = "killed with SIGKILL" if killed else "finished"
        print(f"{what}: {state} after {seconds:.1f}s (the process), peak RSS "
              f"{rss / 1024:.0f} MiB: {out[-400:]}", flush=True)
        own = re.search(r"\) in ([0-9.]+)s", out)
        return float(own.group(1)) if own else seconds

    before = digest(bare_path, "before-synapse-alone")
    figures_before = figures("before reclaim")
    big_room, big_groups = biggest_room(database)
    reclaimed = "SELECT COUNT(*) FROM nidstate_reclaimed_groups"
    measured(
        f"reclaim --room {big_room} ({big_groups:,} groups)",
        ["reclaim", "-c", config_path, "--no-progress", "--room", big_room],
        lambda: count(database, reclaimed) >= big_groups // 2,
    )
    left = big_groups - count(database, reclaimed)
    seconds = measured(
        "reclaim --room (rerun)",
        ["reclaim", "-c", config_path, "--no-progress", "--room", big_room],
    )
    print(f"the biggest room's rerun: {left:,} groups in {seconds:.1f}s, "
          f"{left / seconds if seconds else 0:,.0f} groups/s (the command's own time)", flush=True)
    done = count(database, reclaimed)
    seconds = measured("reclaim, every other room", ["reclaim", "-c", config_path, "--no-progress"])
    print(f"the other rooms: {count(database, reclaimed) - done:,} groups in {seconds:.1f}s",
          flush=True)
    figures_reclaimed = figures("after reclaim")
    vacuum(database)
    figures_vacuumed = figures("after reclaim and VACUUM")
    with_module = digest(config_path, "after-reclaim-with-module")
    same = with_module == before
    print(f"every event and group answered as before reclaim (with the module): {same}")
    verified = True
    if verify_sample:
        out, seconds, rss, _ = run_measured(
            ["verify", "-c", config_path, "--no-progress", "--sample", str(verify_sample)]
        )
        verified = "\nmismatches: 0\n" in f"\n{out}\n" and "UNAVAILABLE" not in out
        print(f"verify --sample {verify_sample} with the groups reclaimed: {seconds:.0f}s, "
              f"peak RSS {rss / 1024:.0f} MiB, 0 mismatches: {verified}:\n{out[-600:]}",
              flush=True)
    without = subprocess.run(
        [sys.executable, "-m", "synapse.app.homeserver", "-c", bare_path],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    refused = "too new for the server to understand" in without.stdout + without.stderr
    print(f"Synapse without the module refuses to start: {refused} (exit {without.returncode})")
    total = count(database, reclaimed)
    measured(
        "restore", ["restore", "-c", config_path, "--no-progress"],
        lambda: count(database, reclaimed) <= total // 2,
    )
    restore_left = count(database, reclaimed)
    seconds = measured("restore (rerun)", ["restore", "-c", config_path, "--no-progress"])
    print(f"restore rerun: {restore_left:,} groups in {seconds:.1f}s "
          f"({restore_left / seconds if seconds else 0:,.0f} groups/s, the command's own time)",
          flush=True)
    figures_restored = figures("after restore")
    after = digest(bare_path, "after-restore-synapse-alone")
    same_after = after == before
    print(f"every event and group answered as before reclaim (Synapse alone): {same_after}")
    deleted = 1 - figures_reclaimed["state_groups_state rows"] / figures_before["state_groups_state rows"]
    footprint = (
        figures_vacuumed["Synapse state tables bytes"] + figures_vacuumed["module tables bytes"]
    ) / figures_before["Synapse state tables bytes"]
    print(
        f"rows of state_groups_state deleted: {deleted:.1%}; state footprint after reclaim and "
        f"VACUUM (Synapse's state tables + the module's) / Synapse's before: {footprint:.3f}; "
        f"rows after restore <= before: "
        f"{figures_restored['state_groups_state rows'] <= figures_before['state_groups_state rows']}"
    )
    ok = same and same_after and refused and verified and deleted >= 0.95
    return 0 if ok else 1


def biggest_room(database: dict) -> tuple[str, int]:
    """The room with the most state groups the module has a snapshot for, and how many."""
    conn = connect(database)
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT sg.room_id, COUNT(*) FROM nidstate_state_groups AS g"
            " JOIN state_groups AS sg ON sg.id = g.state_group"
            " GROUP BY sg.room_id ORDER BY 2 DESC LIMIT 1"
        )
        room, groups = cur.fetchone()
        return room, int(groups)
    finally:
        conn.close()


def migrate_phase(
    data_dir: str, database: dict, config_path: str, sent: int, kill_after: float
) -> int:
    """migrate killed with SIGKILL half-way, rerun; verify and stats."""
    with open(config_path, "w") as f:
        yaml.safe_dump(homeserver_config(data_dir, database, {"mode": "serve"}), f)

    command = [sys.executable, "-m", "synapse_nidstate.cli", "migrate", "-c", config_path,
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Kill it when about half of the events are done.
    while process.poll() is None:
        time.sleep(0.5)
        rows = migrated(database)
        if rows >= sent * kill_after:
            process.send_signal(signal.SIGKILL)
            process.wait()
            print(f"migrate killed with SIGKILL at {rows} events migrated")
            break
    else:
        print("migrate finished before the kill; rerun with a smaller --kill-after")
    rerun = cli("migrate", "-c", config_path, "--no-progress")
    print("rerun:", rerun.stdout.strip() or rerun.stderr.strip())
    verify = cli("verify", "-c", config_path, "--no-progress")
    print(verify.stdout.strip())
    print(f"verify exit code: {verify.returncode}")
    stats = cli("stats", "-c", config_path, "--top", "3")
    print(stats.stdout.strip())
    print(f"data: {data_dir}")
    return verify.returncode


def port_to_postgres(sqlite_path: str, database: dict, data_dir: str) -> int:
    """Synapse's own ``synapse_port_db`` (``synapse_nidstate/demo/port.py``): the
    history a real Synapse wrote on SQLite, copied into PostgreSQL (Synapse's
    tables only, ``event_push_actions`` left out); returns its events."""
    ported = run_in_reactor(lambda: port_sqlite_to_postgres(sqlite_path, database, data_dir))
    events = count(database, "SELECT COUNT(*) FROM events")
    print(f"synapse_port_db: {events} events copied from {sqlite_path} in {ported.seconds:.0f}s "
          f"({ported.push_actions_left_out:,} event_push_actions rows left out)")
    return events


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--big-room-members", type=int, default=5000)
    parser.add_argument("--postgres", metavar="DSN")
    parser.add_argument("--kill-after", type=float, default=0.5, help="part migrated at kill")
    parser.add_argument("--reclaim", action="store_true", help="then reclaim and restore")
    parser.add_argument("--data-dir", help="reuse what an earlier run wrote and migrated")
    parser.add_argument(
        "--port-from", metavar="SQLITE_DB",
        help="with --postgres: instead of writing a history, port this SQLite database "
        "(one a run without --postgres wrote, restored) with synapse_port_db",
    )
    parser.add_argument(
        "--sample", type=int,
        help="the digests cover this many events and groups, not all (big rooms)",
    )
    parser.add_argument(
        "--verify-sample", type=int,
        help="with --reclaim: verify this many sampled events while the groups are reclaimed",
    )
    parser.add_argument("--digest", metavar="HOMESERVER_YAML", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.digest:
        return digest_main(args.digest, args.out, args.sample)

    if args.data_dir:
        config_path = os.path.join(args.data_dir, "homeserver.yaml")
        with open(config_path) as f:
            database = yaml.safe_load(f)["database"]
        return reclaim_phase(
            args.data_dir, database, config_path, args.sample, args.verify_sample
        )

    data_dir = tempfile.mkdtemp(prefix="nidstate-scale-")
    database = postgres_database(args.postgres) if args.postgres else sqlite_database(data_dir)
    if args.port_from:
        if not args.postgres:
            parser.error("--port-from needs --postgres")
        sent = port_to_postgres(args.port_from, database, data_dir)
        config_path = os.path.join(data_dir, "homeserver.yaml")
        code = migrate_phase(data_dir, database, config_path, sent, args.kill_after)
        if args.reclaim and code == 0:
            return reclaim_phase(data_dir, database, config_path)
        return code
    import logging

    logging.basicConfig(filename=os.path.join(data_dir, "homeserver.log"), level=logging.WARNING)
    shape = HistoryShape(
        rooms=args.rooms,
        big_room_members=args.big_room_members,
        small_room_members=10,
        events=args.events,
        seed=3,
        big_room_share=0.05,
    )

    async def write() -> int:
        hs = await start_homeserver(homeserver_config(data_dir, database, None), data_dir)
        try:
            writer = HistoryWriter(shape)
            progress = WorkProgress("writing history, module off", shape.events)
            await writer.create(hs, progress)
            await writer.send(hs, shape.events, progress)
            progress.finish()
            return writer.sent
        finally:
            await stop_homeserver(hs)

    started = time.monotonic()
    sent = run_in_reactor(write)
    print(f"history: {sent} events in {args.rooms} rooms (biggest: {args.big_room_members + 1} "
          f"members) written by Synapse with the module off in {time.monotonic() - started:.0f}s")
    config_path = os.path.join(data_dir, "homeserver.yaml")
    code = migrate_phase(data_dir, database, config_path, sent, args.kill_after)
    if args.reclaim and code == 0:
        return reclaim_phase(data_dir, database, config_path)
    return code


if __name__ == "__main__":
    sys.exit(main())
