"""`synapse-nidstate`: the operator's command line."""

import argparse
import shutil
import sys
import tempfile

from synapse_nidstate import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="synapse-nidstate",
        description="Numeric-ID state storage for Synapse: operator tools.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
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
        "--postgres", metavar="DSN", help="use this PostgreSQL database instead of SQLite"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--keep", action="store_true", help="keep the temporary data directory"
    )

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "-c", "--config-path", required=True, metavar="HOMESERVER_YAML",
            help="Synapse's homeserver.yaml (its databases are used)",
        )
        sub.add_argument("-v", "--verbose", action="store_true", help="log Synapse's INFO lines")
        return sub

    migrate = with_config(commands.add_parser(
        "migrate",
        help="mirror every event persisted before the module ran (resumable, safe "
        "while Synapse runs with the module)",
    ))
    migrate.add_argument(
        "--batch-size", type=_positive_int, default=500, help="events per transaction (500)"
    )
    migrate.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = with_config(commands.add_parser(
        "verify",
        help="compare the mirror with Synapse's own answer for every event (or a sample) "
        "and look for orphan rows; exit 1 on any mismatch or orphan",
    ))
    verify.add_argument("--room", type=_room_id, help="only this room")
    verify.add_argument("--sample", type=_positive_int, help="a random sample of N events")
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")

    from synapse_nidstate.commands import stats

    stats.add_arguments(with_config(commands.add_parser(
        "stats",
        help="storage of Synapse's state tables and of the module's, side by side",
    )))

    drop = with_config(commands.add_parser(
        "drop", help="remove every table of the module (Synapse's own are untouched)"
    ))
    drop.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    args = parser.parse_args(argv)
    if args.command == "demo":
        if not 0 < args.before_fraction < 1:
            parser.error("--before-fraction must be between 0 and 1")
        for name in ("rooms", "events", "big_room_members", "small_room_members", "timing_events"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        from synapse_nidstate.demo.demo import run_demo

        data_dir = tempfile.mkdtemp(prefix="synapse-nidstate-demo-")
        try:
            return run_demo(args, data_dir)
        finally:
            if args.keep:
                print(f"data kept in {data_dir}")
            else:
                shutil.rmtree(data_dir, ignore_errors=True)
    return _run_tool(args)


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

    from synapse.config._base import ConfigError

    from synapse_nidstate.commands import drop, migrate, verify
    from synapse_nidstate.commands.homeserver import (
        ToolConfigError,
        run_in_reactor,
        tool_homeserver,
    )
    from synapse_nidstate.storage.schema import apply_schema

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        hs = tool_homeserver(args.config_path)
        if args.command in ("migrate", "verify"):
            apply_schema(hs)
    except ToolConfigError as e:
        print(f"synapse-nidstate: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        where = ".".join(str(p) for p in e.path or ())
        print(
            f"synapse-nidstate: error in {args.config_path}"
            + (f" at {where}" if where else "")
            + f": {e.msg}",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # a database that cannot be opened, etc.
        print(f"synapse-nidstate: cannot open Synapse's databases: {e}", file=sys.stderr)
        return 2
    from synapse_nidstate.commands import stats

    command = {
        "migrate": migrate.migrate,
        "verify": verify.verify,
        "stats": stats.run,
        "drop": drop.drop,
    }[args.command]
    try:
        return run_in_reactor(lambda: command(hs, args))
    except RuntimeError as e:  # e.g. --plot without matplotlib
        print(f"synapse-nidstate: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
