"""`synapse-nidstate demo`: a real Synapse, history before and after the module, the proof.

1. Synapse starts in this process (SQLite in a temporary directory by default)
   *without* the module and writes the first part of a realistic history
   through its own handlers.
2. It restarts *with* the module (mode serve), migrates that history, then
   keeps sending: those events are mirrored live.
3. It checks every event's mirrored state against Synapse's native answer,
   prints the storage of both side by side, and times state-at-event lookups
   both ways, cold and warm.
"""

import argparse
import logging
import os
import time

import yaml

from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.commands.stats import format_report
from synapse_nidstate.commands.storage_figures import storage_report
from synapse_nidstate.commands.ui import WorkProgress, table
from synapse_nidstate.commands.verify import (
    compare_with_native,
    events_with_state,
    find_orphans,
    room_events_with_state,
    standard_filters,
)
from synapse_nidstate.demo.history import HistoryShape, HistoryWriter
from synapse_nidstate.demo.inprocess import (
    homeserver_config,
    postgres_database,
    sqlite_database,
    start_homeserver,
    stop_homeserver,
)
from synapse_nidstate.demo.timing import TIMING_HEADER, format_timings, time_lookups
from synapse_nidstate.runtime.module import module_for

#: An example of the demo's --postgres (a libpq connection string).
DSN_EXAMPLE = "host=127.0.0.1 port=5432 user=postgres dbname=nidstate_demo"


def check_postgres_dsn(dsn: str) -> str | None:
    """Why the demo cannot use the PostgreSQL database ``dsn`` names, or None.

    Checked before Synapse starts: a malformed DSN, a server that does not
    answer, a database that does not exist, does not have C collation (Synapse
    refuses it) or is not empty (the demo writes a whole history into it).
    """
    try:
        import psycopg2
        import psycopg2.extensions
    except ImportError:
        return "PostgreSQL needs psycopg2: pip install 'synapse-nidstate[postgres]'"
    example = f'e.g. "{DSN_EXAMPLE}"'
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        return f"not a libpq connection string ({_one_line(str(e))}): {dsn!r}; {example}"
    name = params.get("dbname")
    if not name:
        return f"names no database (dbname=...): {dsn!r}; {example}"
    create_sql = "CREATE DATABASE {} LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0"
    create = f"create it with C collation: {create_sql.format(name)}"
    new_one = (
        "give the demo a new database with C collation, e.g. "
        + create_sql.format("nidstate_demo")
    )
    try:
        conn = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.Error as e:
        reason = _one_line(str(e))
        if f'database "{name}" does not exist' in reason:
            return f"the database {name!r} does not exist: {create}"
        return f"cannot connect to PostgreSQL ({reason}); check the DSN, {example}"
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datcollate, datctype FROM pg_database WHERE datname = current_database()"
            )
            collate, ctype = cur.fetchone()
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.tables"
                " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            )
            tables = cur.fetchone()[0]
    except psycopg2.Error as e:
        return f"cannot read the database {name!r}: {_one_line(str(e))}"
    finally:
        conn.close()
    if (collate, ctype) != ("C", "C"):
        return (
            f"the database {name!r} has collation {collate!r} and ctype {ctype!r}; Synapse "
            f"needs 'C': {new_one}"
        )
    if tables:
        return (
            f"the database {name!r} is not empty ({tables} tables); the demo writes a whole "
            f"history into it and needs an empty one: {new_one}"
        )
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _log_to_file(data_dir: str) -> str:
    path = os.path.join(data_dir, "homeserver.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def run_demo(args: argparse.Namespace, data_dir: str) -> int:
    log_path = _log_to_file(data_dir)
    database = postgres_database(args.postgres) if args.postgres else sqlite_database(data_dir)
    shape = HistoryShape(
        rooms=args.rooms,
        big_room_members=args.big_room_members,
        small_room_members=min(args.small_room_members, args.big_room_members),
        events=args.events,
        seed=args.seed,
        # Synapse evaluates push rules for every member on every message: keep
        # most chatter in the small rooms so the default demo stays short.
        big_room_share=0.15,
    )
    before = max(int(shape.events * args.before_fraction), 1)
    show = not args.no_progress

    def config(module: bool) -> dict:
        return homeserver_config(data_dir, database, {"mode": "serve"} if module else None)

    async def demo() -> int:
        # The data directory is named only if it outlives the run (--keep; a
        # failed run names it at its end).
        where = data_dir if args.keep else "a temporary directory"
        engine = "PostgreSQL" if args.postgres else f"SQLite in {where}"
        print(
            f"synapse-nidstate demo: a real Synapse on {engine}; {shape.rooms} rooms "
            f"(the biggest with {shape.big_room_members + 1} members), {shape.events} events, "
            f"seed {shape.seed}"
        )
        writer = HistoryWriter(shape)

        # 1. History written with the module off.
        hs = await start_homeserver(config(module=False), data_dir)
        started = time.monotonic()
        progress = WorkProgress("1/4 writing history, module off", before, enabled=show)
        await writer.create(hs, progress)
        await writer.send(hs, before, progress)
        progress.finish()
        print(f"1/4 wrote {writer.sent} events with the module off ({time.monotonic() - started:.0f}s)")
        await stop_homeserver(hs)

        # 2. The module on: migrate, then keep sending.
        hs = await start_homeserver(config(module=True), data_dir)
        try:
            module = module_for(hs)
            assert module is not None
            remaining = await module.migrator.remaining()
            progress = WorkProgress("2/4 migrating", remaining, enabled=show)
            started = time.monotonic()
            await module.migrator.run(progress)
            progress.finish()
            seconds = max(time.monotonic() - started, 1e-9)
            migrated = module.stats.migration.events_migrated
            print(
                f"2/4 migrated {migrated} events in {seconds:.1f}s "
                f"({migrated / seconds:,.0f} events/s)"
            )
            progress = WorkProgress("3/4 sending, module on", shape.events - writer.sent, enabled=show)
            started = time.monotonic()
            live_from = writer.sent
            await writer.send(hs, shape.events, progress)
            progress.finish()
            print(
                f"3/4 sent {writer.sent - live_from} more events, mirrored live "
                f"({time.monotonic() - started:.0f}s)"
            )
            # The strings beside the big blocks, as `migrate` gives them after
            # the history and the background job after the live writes.
            await module.migrator.fill_block_strings()

            # 3. Verify every event, both ways.
            total = sum([len(await room_events_with_state(hs, r)) for r in writer.rooms])
            filters = standard_filters(writer.users[1:4])
            progress = WorkProgress("4/4 verifying", total, enabled=show)
            result = await compare_with_native(
                module.lookups, events_with_state(hs), filters, progress
            )
            progress.finish()
            orphans = await find_orphans(hs)
            print(
                f"\nverify: {result.events} events x {len(filters)} filters "
                f"({', '.join(filters)}): {result.comparisons} answers compared, "
                f"{len(result.mismatches)} mismatches, {result.unmirrored} not mirrored, "
                f"{orphans.count} orphan rows"
            )
            for mismatch in result.mismatches[:10]:
                print(
                    f"  MISMATCH {mismatch.event_id} ({mismatch.filter_name}): "
                    f"{mismatch.differing_keys[:5]}"
                )

            print("\nstorage:")
            print(format_report(await storage_report(hs, top=3)))

            big_room = writer.rooms[0]
            events = (await room_events_with_state(hs, big_room))[-args.timing_events :]
            member = writer.users[1]
            timings = []
            for cold in (True, False):
                timings += await time_lookups(
                    hs, module.lookups, events, member, writer.users[2:], cold=cold
                )
            print(
                f"\nstate-at-event lookups in the biggest room ({len(events)} events; "
                "native = Synapse's state groups, NID = the mirror; same process, same run):"
            )
            print(table(format_timings(timings), TIMING_HEADER))
            if args.keep:
                # Without --keep the directory, and the log in it, is removed
                # after a successful run (kept, and named, after a failed one).
                print(f"\nSynapse's log: {log_path}")
                config_path = os.path.join(data_dir, "homeserver.yaml")
                with open(config_path, "w") as f:
                    yaml.safe_dump(config(module=True), f)
                print(
                    f"kept: {config_path} (try: synapse-nidstate verify -c {config_path})"
                )
            ok = result.ok and not result.unmirrored and not orphans.count
            print("\nRESULT:", "OK, the mirror equals Synapse's state" if ok else "FAILED")
            return 0 if ok else 1
        finally:
            await stop_homeserver(hs)

    return run_in_reactor(demo)
