"""Issue #3's acceptance run: migrate (killed with SIGKILL half-way, then rerun)
and verify on a database a real Synapse wrote with the module off.

    python scripts/migration_at_scale.py --events 50000 --rooms 20 --big-room-members 5000
    python scripts/migration_at_scale.py ... --postgres "host=127.0.0.1 user=postgres dbname=X"

Writes the history through Synapse's own handlers (slow: Synapse's own event
creation is the bound), then runs the real `synapse-nidstate` commands as
processes and prints what they printed.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

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


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synapse_nidstate.cli", *args], capture_output=True, text=True
    )


def migrated(database: dict) -> int:
    """Events with a snapshot, read directly from the database."""
    if database["name"] == "sqlite3":
        import sqlite3

        conn = sqlite3.connect(database["args"]["database"], timeout=60)
    else:
        import psycopg2

        a = database["args"]
        conn = psycopg2.connect(
            host=a.get("host"), port=a.get("port"), user=a.get("user"), dbname=a["database"]
        )
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT COUNT(*) FROM nidstate_events WHERE snapshot_nid IS NOT NULL"
        )
        return cur.fetchone()[0]
    except Exception:
        return 0  # the tables do not exist yet
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--big-room-members", type=int, default=5000)
    parser.add_argument("--postgres", metavar="DSN")
    parser.add_argument("--kill-after", type=float, default=0.5, help="part migrated at kill")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="nidstate-scale-")
    database = postgres_database(args.postgres) if args.postgres else sqlite_database(data_dir)
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
    with open(config_path, "w") as f:
        yaml.safe_dump(homeserver_config(data_dir, database, {"mode": "serve"}), f)

    command = [sys.executable, "-m", "synapse_nidstate.cli", "migrate", "-c", config_path,
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Kill it when about half of the events are done.
    while process.poll() is None:
        time.sleep(0.5)
        rows = migrated(database)
        if rows >= sent * args.kill_after:
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


if __name__ == "__main__":
    sys.exit(main())
