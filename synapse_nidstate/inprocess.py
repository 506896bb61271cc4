"""A real Synapse homeserver in this process: for the demo, the benchmarks and the tests.

Follows Synapse's own start-up path (``HomeServerConfig.parse_config_dict`` ->
``create_homeserver`` -> ``setup`` -> ``start``); the server has no listeners
and is driven through its handlers.
"""

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import synapse.app.homeserver as synapse_app
from synapse.config.homeserver import HomeServerConfig
from synapse.logging.context import LoggingContext, PreserveLoggingContext
from synapse.server import HomeServer
from synapse.types import ISynapseReactor
from twisted.internet import defer
from twisted.internet import reactor as _reactor

reactor = cast(ISynapseReactor, _reactor)

SERVER_NAME = "nidstate.test"
# A throwaway key for servers that never federate.
SIGNING_KEY = "ed25519 a_lPym qvioDNmfExFBRPgdTU+wtFYKq4JfwFRv7sYVgWvmgJg"

T = TypeVar("T")

_UNLIMITED = {"per_second": 1_000_000, "burst_count": 1_000_000}


def homeserver_config(
    data_dir: str,
    database: dict[str, Any],
    module_config: dict[str, Any] | None,
    server_name: str = SERVER_NAME,
) -> dict[str, Any]:
    """A minimal homeserver.yaml, as a dict, with the module when ``module_config`` is given."""
    config: dict[str, Any] = {
        "server_name": server_name,
        "signing_key": SIGNING_KEY,
        "trusted_key_servers": [],
        "report_stats": False,
        "macaroon_secret_key": "nidstate-macaroon",
        "registration_shared_secret": "nidstate-secret",
        "database": database,
        "media_store_path": os.path.join(data_dir, "media"),
        "listeners": [],
        "federation_sender_instances": [],
        "enable_metrics": False,
        "rc_message": _UNLIMITED,
        "rc_room_creation": _UNLIMITED,
        "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
        "rc_invites": {
            "per_room": _UNLIMITED,
            "per_user": _UNLIMITED,
            "per_issuer": _UNLIMITED,
        },
        "modules": [],
    }
    if module_config is not None:
        config["modules"] = [
            {"module": "synapse_nidstate.NidStateModule", "config": module_config}
        ]
    return config


def sqlite_database(data_dir: str) -> dict[str, Any]:
    return {"name": "sqlite3", "args": {"database": os.path.join(data_dir, "homeserver.db")}}


def postgres_database(dsn: str) -> dict[str, Any]:
    """Synapse's database config for a libpq DSN (``host=... dbname=...``)."""
    import psycopg2.extensions

    args: dict[str, Any] = dict(psycopg2.extensions.parse_dsn(dsn))
    if "dbname" in args:
        args["database"] = args.pop("dbname")
    args.setdefault("cp_min", 1)
    args.setdefault("cp_max", 5)
    return {"name": "psycopg2", "args": args}


async def start_homeserver(config_dict: dict[str, Any], data_dir: str) -> HomeServer:
    """Build, set up and start a homeserver; the caller shuts it down."""
    config = HomeServerConfig()
    config.parse_config_dict(config_dict, config_dir_path=data_dir, data_dir_path=data_dir)
    hs = synapse_app.create_homeserver(config, reactor=reactor)
    hs.setup()
    try:
        await synapse_app.start(hs, freeze=False)
    except BaseException:
        await stop_homeserver(hs)
        raise
    return hs


async def stop_homeserver(hs: HomeServer) -> None:
    if hs._is_shutdown:
        return
    await hs.shutdown()
    # Synapse's background loops leave sleeps behind; they belong to the
    # server just shut down.
    for call in reactor.getDelayedCalls():  # type: ignore[misc]  # zope interface without mypy-zope
        if call.active():  # type: ignore[misc]  # zope interface without mypy-zope
            call.cancel()  # type: ignore[misc]  # zope interface without mypy-zope


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
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> "defer.Deferred[T]":
        async def run() -> T:
            with LoggingContext(name=name or fn.__name__, server_name=SERVER_NAME):
                return await fn(*args, **kwargs)

        with PreserveLoggingContext():
            return defer.ensureDeferred(run())

    return wrapper


class ToolConfigError(Exception):
    """The homeserver.yaml given to the command line cannot be used."""


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
    config = HomeServerConfig()
    config.parse_config_dict(raw, config_dir_path=config_dir, data_dir_path=config_dir)
    hs = GenericWorkerServer(config.server.server_name, config=config, reactor=reactor)
    hs.setup()
    return hs


def module_config_of(hs: HomeServer) -> Any:
    """The parsed config of synapse-nidstate in ``hs``'s homeserver.yaml, or None."""
    from synapse_nidstate.module import NidStateModule

    for module, config in hs.config.modules.loaded_modules:
        if module is NidStateModule:
            return config
    return None
