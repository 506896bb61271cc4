"""`synapse-nidstate`: the operator's command line."""

import argparse
import os
import shutil
import signal
import sys
import tempfile
from typing import TYPE_CHECKING

from synapse_nidstate import __version__

if TYPE_CHECKING:
    from synapse.config._base import ConfigError

DEMO_DESCRIPTION = """\
Start a real Synapse in this process (SQLite in a temporary directory, or the
empty PostgreSQL database --postgres names), write a history with the module
off, enable the module (mode serve), migrate that history and keep sending;
then check every event's mirrored state against Synapse's own, print the
storage of both and time state-at-event lookups both ways.

It never touches a running Synapse or its database. The temporary directory
is removed after a successful run (--keep keeps it and writes a
homeserver.yaml there); after a failed run it is kept and its path printed.

--postgres takes a libpq connection string naming an empty database with C
collation, e.g. --postgres "{dsn}";
create it with: CREATE DATABASE nidstate_demo LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0

exit codes: 0 the mirror equals Synapse's state; 1 it does not, or the demo
stopped with an error; 2 bad options (e.g. a --postgres database that cannot
be used).
"""

#: Events per transaction of `migrate`: each batch costs about 47 statements
#: whatever its size, and no live traffic waits on the command's transactions
#: (the background migration, beside it, keeps to its own ``batch_size``).
MIGRATE_BATCH_SIZE = 2000

MIGRATE_DESCRIPTION = """\
Mirror every event Synapse persisted before the module ran (or while it was
disabled), in stream order, --batch-size events per transaction. Resumable: a
run that was interrupted goes on from its last batch at the next run.

Safe while Synapse runs, with or without the module: it writes only the
module's tables and never overwrites a snapshot the live mirror wrote. On
SQLite (where Synapse is a single process) prefer running it with Synapse
stopped, or use the background migration.

exit codes: 0 done; 2 bad input (homeserver.yaml, or a database that does not
exist or is not Synapse's).
"""

VERIFY_DESCRIPTION = """\
Compare the mirror with Synapse's own answer for every event with state (or
--sample N random ones, or those of --room ID), for full state, all members,
a lazy-load members filter and a visibility filter; list each mismatch, and
orphan rows (mirror rows for events or state groups Synapse no longer has).

Safe while Synapse runs: it only reads (it creates the module's tables if
they are missing, as the module would).

exit codes: 0 no mismatch and no orphan; 1 a mismatch or an orphan; 2 bad
input (homeserver.yaml, a database that does not exist or is not Synapse's,
a --room the server does not have).
"""

STATS_DESCRIPTION = """\
Storage of Synapse's state tables against the module's: rows, table, index and
TOAST bytes from the database's own size functions (PostgreSQL) or page
accounting (SQLite dbstat), bytes per state entry, the ratio, and the rooms
with the most state on both sides.

Read-only: safe while Synapse runs.

exit codes: 0 done; 1 --plot without matplotlib; 2 bad input (homeserver.yaml,
or a database that does not exist or is not Synapse's).
"""

RECLAIM_DESCRIPTION = """\
Delete the rows of state_groups_state that the NID tables replace: room by
room, oldest state group first, a batch per transaction. Before a group's rows
are deleted, Synapse's answer from them is compared with the group's snapshot
in the same transaction; on any difference the rows stay (counted, logged).
Safe beside a running Synapse that loads the module in mode serve (on SQLite,
stop Synapse first, or use the background job); resumable (killed, it starts
over with what is left). Groups without a snapshot (not
migrated yet, partial state) keep their rows.

While any group is reclaimed, Synapse refuses to start without the module
("Cannot use this database as it is too new for the server to understand"),
and so does synapse_port_db: run `restore` before removing the module.

exit codes: 0 done; 1 some groups kept their rows (their proof failed); 2 bad
input (no module in mode serve, a separate state database, an unknown room).
"""

RESTORE_DESCRIPTION = """\
Write back the rows reclaim deleted, from the NID tables, in Synapse's own
layout: a delta along each edge Synapse stored, full rows where it has none
(so its full copies every 100 hops are where Synapse put them). Newest group
first, a batch per transaction, resumable. Once no group is reclaimed,
Synapse's schema_compat_version is back and Synapse runs without the module.

exit codes: 0 done; 1 a group could not be written back (named); 2 bad input.
"""

DROP_DESCRIPTION = """\
Remove every table of the module from Synapse's database (asks first; --yes
skips the question). Synapse's own tables are untouched, and Synapse runs
unchanged without the module. Refused while any state group is reclaimed:
run restore first.

Not meant to run beside a Synapse that loads the module: its mirror and (in
mode serve) its lookups need those tables, and it creates them again at its
next start. Remove the module from homeserver.yaml and restart Synapse first
(or stop Synapse); enabled again later, the module recreates its tables and
migrate catches up.

exit codes: 0 dropped, or nothing to drop; 1 declined at the question, or
refused (groups are reclaimed); 2 bad input, or no --yes when standard input
is not a terminal.
"""


def main(argv: list[str] | None = None) -> int:
    """The entry point: ``_main``, with Ctrl-C before the reactor runs (while
    Synapse is imported and its databases opened; the reactor handles SIGINT
    after) as one line and exit code 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        command = words[0] if words else "synapse-nidstate"
        print(f"synapse-nidstate: {command} interrupted; run it again to go on", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        # Not a return: an interrupt that went through exec() of a string (as
        # dataclasses does while Synapse is imported) leaves CPython believing
        # it was unhandled, and the process would then end by SIGINT (-2), not
        # 130. Nothing is open that needs closing before the reactor runs.
        os._exit(130)


def _main(argv: list[str] | None) -> int:
    from synapse_nidstate.demo.demo import DSN_EXAMPLE

    parser = argparse.ArgumentParser(
        prog="synapse-nidstate",
        description="Numeric-ID state storage for Synapse: operator tools.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, description: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    demo = add(
        "demo",
        DEMO_DESCRIPTION.replace("{dsn}", DSN_EXAMPLE),
        help="start a real Synapse in this process with the module, write a history "
        "and show that every event's mirrored state equals Synapse's",
    )
    demo.add_argument("--rooms", type=int, default=6, help="rooms (default 6)")
    demo.add_argument("--events", type=int, default=2500, help="events to send (default 2500)")
    demo.add_argument(
        "--big-room-members", type=int, default=1000, help="members of the biggest room (1000)"
    )
    demo.add_argument(
        "--small-room-members", type=int, default=10, help="members of the other rooms (10)"
    )
    demo.add_argument(
        "--before-fraction", type=float, default=0.6,
        help="part of the events written before the module is enabled (0.6)",
    )
    demo.add_argument(
        "--timing-events", type=int, default=50, help="events timed per lookup (50)"
    )
    demo.add_argument("--seed", type=int, default=1, help="random seed of the history (1)")
    demo.add_argument(
        "--postgres", metavar="DSN",
        help="use this empty PostgreSQL database (C collation) instead of SQLite, "
        f'e.g. "{DSN_EXAMPLE}"',
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--keep", action="store_true",
        help="keep the temporary data directory and write a homeserver.yaml there "
        "(a failed run keeps it anyway)",
    )

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "-c", "--config-path", required=True, metavar="HOMESERVER_YAML",
            help="Synapse's homeserver.yaml (its databases are used)",
        )
        sub.add_argument("-v", "--verbose", action="store_true", help="log Synapse's INFO lines")
        return sub

    migrate = with_config(add(
        "migrate",
        MIGRATE_DESCRIPTION,
        help="mirror every event persisted before the module ran (resumable, safe "
        "while Synapse runs with the module)",
    ))
    migrate.add_argument(
        "--batch-size", type=_positive_int, default=MIGRATE_BATCH_SIZE,
        help=f"events per transaction ({MIGRATE_BATCH_SIZE}; the background migration's is "
        "its batch_size, 500)",
    )
    migrate.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = with_config(add(
        "verify",
        VERIFY_DESCRIPTION,
        help="compare the mirror with Synapse's own answer for every event (or a sample) "
        "and look for orphan rows; exit 1 on any mismatch or orphan",
    ))
    verify.add_argument("--room", type=_room_id, help="only this room")
    verify.add_argument("--sample", type=_positive_int, help="a random sample of N events")
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")

    from synapse_nidstate.commands import stats

    stats.add_arguments(with_config(add(
        "stats",
        STATS_DESCRIPTION,
        help="storage of Synapse's state tables and of the module's, side by side",
    )))

    def with_groups(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """What reclaim and restore share: a room, a batch of groups, the bar."""
        sub.add_argument("--room", type=_room_id, help="only this room")
        sub.add_argument(
            "--batch-size", type=_positive_int, default=100,
            help="state groups per transaction (100)",
        )
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        return sub

    with_groups(with_config(add(
        "reclaim",
        RECLAIM_DESCRIPTION,
        help="delete the rows of state_groups_state the NID tables replace, each group "
        "proved first (resumable; restore writes them back)",
    ))).add_argument("--dry-run", action="store_true", help="prove every group, delete nothing")
    with_groups(with_config(add(
        "restore",
        RESTORE_DESCRIPTION,
        help="write back the rows reclaim deleted, in Synapse's layout (then the module "
        "can be removed)",
    )))

    drop = with_config(add(
        "drop", DROP_DESCRIPTION,
        help="remove every table of the module (Synapse's own are untouched)",
    ))
    drop.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    args = parser.parse_args(argv)
    if args.command == "demo":
        if not 0 < args.before_fraction < 1:
            parser.error("--before-fraction must be between 0 and 1")
        for name in ("rooms", "events", "big_room_members", "small_room_members", "timing_events"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        runner = _run_demo
    else:
        runner = _run_tool
    return runner(args)


def _run_demo(args: argparse.Namespace) -> int:
    from synapse_nidstate.demo.demo import check_postgres_dsn, run_demo

    if args.postgres is not None:
        problem = check_postgres_dsn(args.postgres)
        if problem is not None:
            print(f"synapse-nidstate: --postgres: {problem}", file=sys.stderr)
            return 2
    data_dir = tempfile.mkdtemp(prefix="synapse-nidstate-demo-")
    code: int | None = None
    try:
        code = run_demo(args, data_dir)
        return code
    finally:
        if args.keep:
            print(f"data kept in {data_dir}")
        elif code == 0:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            # What an operator needs after a failure is Synapse's log.
            what = "failed" if code is not None else "stopped before its end"
            print(
                f"synapse-nidstate: the demo {what}; its data directory is kept: {data_dir} "
                f"(Synapse's log: {data_dir}/homeserver.log)",
                file=sys.stderr,
            )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value!r}")
    return number


def _room_id(value: str) -> str:
    from synapse_nidstate.commands.homeserver import check_room_id

    return check_room_id(value)


def _run_tool(args: argparse.Namespace) -> int:
    """Run a command against the databases of an operator's homeserver.yaml."""
    import logging
    import logging.handlers

    from synapse.config._base import ConfigError

    from synapse_nidstate.commands import drop, migrate, reclaim, verify
    from synapse_nidstate.commands.homeserver import (
        CommandInputError,
        Interrupted,
        ToolConfigError,
        run_in_reactor,
        tool_homeserver,
    )
    from synapse_nidstate.storage.schema import apply_schema

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # What Synapse logs while its databases open is held back: shown if they
    # open, dropped if they do not, where the one-line error says it (Synapse
    # logs "incorrect collation" before it raises it); --verbose shows all.
    root = logging.getLogger()
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    held.setTarget(root.handlers[0])
    handlers, root.handlers = root.handlers, [held]
    opened = False
    try:
        hs = tool_homeserver(args.config_path)
        if args.command in ("migrate", "verify", "reclaim", "restore"):
            apply_schema(hs)
        opened = True
    except ToolConfigError as e:
        print(f"synapse-nidstate: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"synapse-nidstate: {config_error_text(e, args.config_path)}", file=sys.stderr)
        return 2
    except Exception as e:  # a database that cannot be opened, etc.
        print(
            f"synapse-nidstate: cannot open Synapse's databases: {_one_line(_message(e))}",
            file=sys.stderr,
        )
        return 2
    finally:
        root.handlers = handlers
        if opened or args.verbose:
            held.flush()
        held.buffer.clear()
    from synapse_nidstate.commands import stats

    command = {
        "migrate": migrate.migrate,
        "verify": verify.verify,
        "stats": stats.run,
        "drop": drop.drop,
        "reclaim": reclaim.reclaim,
        "restore": reclaim.restore,
    }[args.command]
    try:
        return run_in_reactor(lambda: command(hs, args))
    except CommandInputError as e:  # e.g. a --room the server does not have
        print(f"synapse-nidstate: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. --plot without matplotlib
        print(f"synapse-nidstate: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # every command resumes or starts over safely
        print(f"synapse-nidstate: {args.command} {e}; run it again to go on", file=sys.stderr)
        return 130


def config_error_text(error: "ConfigError", config_path: str) -> str:
    """A ConfigError as one line, as Synapse's start-up prints it (its
    ``format_config_error``: where, what, and every cause; Synapse's module loader
    keeps a module's own reason only as the ``__cause__``)."""
    from synapse.config._base import format_config_error

    return f"{config_path}: {_one_line(''.join(format_config_error(error)))}"


def _message(error: Exception) -> str:
    """An exception's message; some of Synapse's carry it as a logging-style
    format and its arguments (``IncorrectDatabaseSetup("... %r ...", collation)``),
    whose ``str`` is the tuple."""
    if len(error.args) > 1 and isinstance(error.args[0], str):
        try:
            return error.args[0] % error.args[1:]
        except (TypeError, ValueError):
            pass
    return str(error)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run() -> None:
    """The process's entry point (``synapse-nidstate``, ``python -m``): ``main``,
    then its exit code whatever comes. A Ctrl-C after the command has ended
    (its result printed, the interpreter shutting down) would otherwise end
    the process by SIGINT instead of with the code it printed its result for."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
