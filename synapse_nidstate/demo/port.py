"""A history a real Synapse wrote on SQLite, moved to PostgreSQL by Synapse's own
``synapse_port_db`` (the tool operators move with): the same events and state
groups on both engines, without writing the history through the handlers twice.

The source is never touched: the port reads a copy, on which Synapse first
finishes its pending background updates (``synapse_port_db`` refuses to start
otherwise; a short-lived in-process server leaves them pending). The copy's
``event_push_actions`` is emptied: in a room of thousands of local
members every message gives each of them a push action (millions of rows at
the larger scales, most of the file), which has nothing to do with state and
would make the port last hours here. Every other table is ported as Synapse
wrote it.
"""

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from typing import Any

import attr
import yaml
from synapse.logging.context import defer_to_thread
from synapse.util.duration import Duration

from synapse_nidstate.demo.inprocess import (
    homeserver_config,
    reactor,
    start_homeserver,
    stop_homeserver,
)


@attr.s(frozen=True, auto_attribs=True)
class Ported:
    #: Seconds ``synapse_port_db`` took (the copy and the background updates excluded).
    seconds: float
    #: ``event_push_actions`` rows left out of the copy.
    push_actions_left_out: int
    #: ``synapse_port_db``'s own output.
    log_path: str


class PortFailed(Exception):
    pass


async def finish_background_updates(config_dict: dict[str, Any], data_dir: str) -> None:
    """Start Synapse on ``config_dict``, with the module off, and wait until its
    own background updater has run every pending update to the end."""
    hs = await start_homeserver(config_dict, data_dir)
    try:
        updater = hs.get_datastores().main.db_pool.updates
        updater.minimum_background_batch_size = 10_000  # as fast as it goes
        while not await updater.has_completed_background_updates():
            await hs.get_clock().sleep(Duration(milliseconds=200))
    finally:
        await stop_homeserver(hs)


async def port_sqlite_to_postgres(
    sqlite_path: str,
    database: dict[str, Any],
    work_dir: str,
) -> Ported:
    """Port the SQLite database at ``sqlite_path`` into ``database`` (Synapse's
    ``psycopg2`` config of an empty database); ``work_dir`` holds the copy, the
    configs and the port's log. Runs inside the reactor."""
    copy = os.path.join(work_dir, "port-source.db")
    shutil.copyfile(sqlite_path, copy)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(sqlite_path + suffix):
            shutil.copyfile(sqlite_path + suffix, copy + suffix)
    conn = sqlite3.connect(copy, isolation_level=None)
    try:
        left_out = conn.execute("SELECT COUNT(*) FROM event_push_actions").fetchone()[0]
        conn.execute("DELETE FROM event_push_actions")
    finally:
        conn.close()
    await finish_background_updates(
        homeserver_config(work_dir, {"name": "sqlite3", "args": {"database": copy}}, None),
        work_dir,
    )
    target_config = os.path.join(work_dir, "port-target.yaml")
    with open(target_config, "w") as f:
        yaml.safe_dump(homeserver_config(work_dir, database, None), f)
    log_path = os.path.join(work_dir, "synapse_port_db.log")
    started = time.monotonic()
    with open(log_path, "w") as out:
        done = await defer_to_thread(
            reactor,
            subprocess.run,
            [sys.executable, "-m", "synapse._scripts.synapse_port_db",
             "--sqlite-database", copy, "--postgres-config", target_config],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=work_dir,
        )
    if done.returncode != 0:
        raise PortFailed(f"synapse_port_db failed (exit {done.returncode}); its output: {log_path}")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(copy + suffix):
            os.remove(copy + suffix)
    return Ported(time.monotonic() - started, left_out, log_path)
