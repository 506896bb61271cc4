"""Synapse's stores for a command, and the reactor to run it in.

A command opens an operator's databases the way a Synapse worker does
(``tool_homeserver``) and runs as Synapse's own entry point runs
(``run_in_reactor``).
"""

import argparse
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import synapse
from synapse.config._base import Config
from synapse.config.homeserver import HomeServerConfig
from synapse.logging.context import LoggingContext, PreserveLoggingContext
from synapse.server import HomeServer
from synapse.storage.prepare_database import PrepareDatabaseException
from synapse.types import ISynapseReactor, RoomID
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from synapse_nidstate.runtime import failsafe
from synapse_nidstate.runtime.config import NidStateConfig
from synapse_nidstate.storage import NidStore

reactor = cast(ISynapseReactor, _reactor)

T = TypeVar("T")

#: The server name of the logging contexts commands run in (a label only).
LOG_SERVER_NAME = "synapse-nidstate"


class Interrupted(Exception):
    """The command was stopped (SIGINT, SIGTERM) before it finished."""


def run_in_reactor(main: Callable[[], Awaitable[T]], name: str = "synapse-nidstate") -> T:
    """Run ``main`` with the reactor, the way Synapse's own entry point does.

    The reactor runs in the sentinel logging context; ``main`` starts in a
    LoggingContext of its own. Returns what ``main`` returned or raises what it raised.
    """
    outcome: list[Any] = []

    async def wrapper() -> None:
        try:
            outcome.append(("ok", await main()))
        except BaseException as e:  # handed to the caller below
            outcome.append(("error", e))
        finally:
            reactor.stop()  # type: ignore[misc]  # zope interface without mypy-zope

    def begin() -> None:
        in_logcontext(wrapper, name)()

    reactor.callWhenRunning(begin)
    with PreserveLoggingContext():
        reactor.run()  # type: ignore[misc]  # zope interface without mypy-zope
    if not outcome:
        # The reactor stopped before ``main`` ended: Twisted's SIGINT/SIGTERM handlers.
        raise Interrupted("stopped by a signal before it finished")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def in_logcontext(
    fn: Callable[..., Awaitable[T]], name: str | None = None
) -> Callable[..., "defer.Deferred[T]"]:
    """Run an async function as Synapse runs its background processes.

    The function runs, to its end, in a LoggingContext of its own (Synapse's
    deferreds switch to the sentinel context while they wait); the returned
    Deferred fires in the sentinel context, where the reactor runs.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> "defer.Deferred[T]":
        async def run() -> T:
            with LoggingContext(name=name or fn.__name__, server_name=LOG_SERVER_NAME):
                return await fn(*args, **kwargs)

        with PreserveLoggingContext():
            return defer.ensureDeferred(run())

    return wrapper


class ToolConfigError(Exception):
    """The homeserver.yaml given to the command line cannot be used."""


class CommandInputError(Exception):
    """A command's input names something the server does not have (exit code 2)."""


#: The name the command line's homeserver takes in a worker deployment.
TOOL_WORKER_NAME = "synapse-nidstate-cli"


def tool_homeserver(config_path: str) -> HomeServer:
    """Synapse's stores on an operator's homeserver.yaml, for the command line.

    Built the way a Synapse worker is (``generic_worker``): it opens the same
    databases (main and, if split, state) and Synapse's stores read them, but it
    writes no Synapse stream, runs no background task and starts no listener or
    replication, so it is safe beside a running Synapse. The module is not
    started in it; its config is parsed (and checked) as Synapse would.
    """
    import yaml
    from synapse.app.generic_worker import GenericWorkerServer

    try:
        with open(config_path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ToolConfigError(f"cannot read {config_path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ToolConfigError(f"{config_path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ToolConfigError(f"{config_path} is not a homeserver configuration")
    raw = dict(raw)
    raw["worker_app"] = "synapse.app.generic_worker"
    raw["worker_name"] = TOOL_WORKER_NAME
    raw["worker_listeners"] = []
    # A worker config needs the main process's address; this one never connects.
    instance_map = dict(raw.get("instance_map") or {})
    instance_map.setdefault("main", {"host": "127.0.0.1", "port": 1})
    raw["instance_map"] = instance_map
    config_dir = os.path.dirname(os.path.abspath(config_path))
    with _directories_removed_on_failure():
        config = HomeServerConfig()
        config.parse_config_dict(raw, config_dir_path=config_dir, data_dir_path=config_dir)
        check_sqlite_databases(config, config_path)
        # Read past the reclaim marker even where homeserver.yaml no longer loads
        # the module: `restore` is how an operator takes it out.
        failsafe.install()
        hs = GenericWorkerServer(config.server.server_name, config=config, reactor=reactor)
        try:
            hs.setup()
        except PrepareDatabaseException as e:
            raise ToolConfigError(_schema_problem(str(e), config_path)) from e
    return hs


@contextlib.contextmanager
def _directories_removed_on_failure() -> Iterator[None]:
    """Synapse's config parsing creates the directories it names (its
    ``Config.ensure_directory``: the media store, ...); a command that then
    fails (a missing database, ...) removes again those it created, if empty,
    so that bad input leaves nothing behind."""
    created: list[str] = []
    original = Config.__dict__["ensure_directory"]

    def ensure_directory(cls: type[Config], dir_path: str) -> str:
        missing, path = [], cls.abspath(dir_path)
        while not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
        result = original.__func__(cls, dir_path)
        created.extend(missing)  # deepest first
        return result

    Config.ensure_directory = classmethod(ensure_directory)  # type: ignore[assignment,method-assign]
    try:
        yield
    except BaseException:
        for directory in created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if still empty
        raise
    finally:
        Config.ensure_directory = original  # type: ignore[method-assign]


def check_sqlite_databases(config: HomeServerConfig, config_path: str) -> None:
    """Refuse an SQLite database file that does not exist.

    SQLite would create an empty file when Synapse opens it; a command must
    never create Synapse's database, only use the one Synapse made.
    """
    for database in config.database.databases:
        if database.config.get("name", "sqlite3") != "sqlite3":
            continue
        path = str(database.config.get("args", {}).get("database", ""))
        if path == ":memory:" or not path:
            raise ToolConfigError(
                f"the SQLite database of {config_path} is {path or 'not set'!r}: "
                "synapse-nidstate needs Synapse's database file"
            )
        if not os.path.isfile(path):
            shown = path if os.path.isabs(path) else f"{path} ({os.path.abspath(path)})"
            key = (
                "database.args.database"
                if len(config.database.databases) == 1
                else f"databases.{database.name}.args.database"
            )
            raise ToolConfigError(
                f"the database of {config_path} does not exist: no SQLite file {shown}. "
                f"Check {key} there (synapse-nidstate opens the database Synapse "
                "created and never creates one)"
            )
        if os.path.getsize(path) == 0:  # opening it would write SQLite's header
            raise ToolConfigError(
                f"the database of {config_path}, {path}, is an empty file, not a Synapse "
                "database: check the database settings there, or start Synapse on it once first"
            )


def _schema_problem(error: str, config_path: str) -> str:
    """Synapse's worker-oriented schema errors, in the words that fit a command."""
    from synapse.storage.prepare_database import EMPTY_DATABASE_ON_WORKER_ERROR

    if error == EMPTY_DATABASE_ON_WORKER_ERROR:
        return (
            f"the database of {config_path} is not a Synapse database (it has no Synapse "
            "tables): check the database settings there, or start Synapse on it once first"
        )
    if "before starting worker processes" in error:
        reason = error.split(": run the main synapse process", 1)[0]
        return (
            f"the database of {config_path} has an older schema than this Synapse "
            f"(Synapse {synapse.__version__}): {reason}. Start this release of Synapse on it once "
            "(it upgrades the schema), or run synapse-nidstate from the environment of the "
            "Synapse that uses this database"
        )
    return f"cannot use the database of {config_path}: {' '.join(error.split())}"


def module_config_of(hs: HomeServer) -> Any:
    """The parsed config of synapse-nidstate in ``hs``'s homeserver.yaml, or None."""
    from synapse_nidstate.runtime.module import NidStateModule  # noqa: PLC0415

    for module, config in hs.config.modules.loaded_modules:
        if module is NidStateModule:
            return config
    return None


def nid_store(hs: HomeServer) -> NidStore:
    """The module's store on ``hs``, with the cache sizes its homeserver.yaml sets."""
    return NidStore(hs, module_config_of(hs) or NidStateConfig())


async def check_room_exists(hs: HomeServer, room_id: str | None) -> None:
    """A ``--room`` this server does not have is bad input (every command words it
    so): a typo must not pass as "0 events"."""
    if room_id is not None and await hs.get_datastores().main.get_room(room_id) is None:
        raise CommandInputError(f"--room {room_id}: this server ({hs.hostname}) has no such room")


def check_room_id(value: str) -> str:
    """argparse type: a well-formed Matrix room ID."""
    if not RoomID.is_valid(value):
        raise argparse.ArgumentTypeError(f"not a Matrix room ID (like !abc:example.org): {value!r}")
    return value
