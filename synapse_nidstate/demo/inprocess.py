"""A real Synapse homeserver in this process: for the demo, the benchmarks and the tests.

Follows Synapse's own start-up path (``HomeServerConfig.parse_config_dict`` ->
``create_homeserver`` -> ``setup`` -> ``start``); the server has no listeners
and is driven through its handlers.
"""

import os
from typing import Any, cast

import synapse.app.homeserver as synapse_app
from synapse.config.homeserver import HomeServerConfig
from synapse.server import HomeServer
from synapse.types import ISynapseReactor
from twisted.internet import reactor as _reactor

reactor = cast(ISynapseReactor, _reactor)

SERVER_NAME = "nidstate.test"
# A throwaway key for servers that never federate.
SIGNING_KEY = "ed25519 a_lPym qvioDNmfExFBRPgdTU+wtFYKq4JfwFRv7sYVgWvmgJg"

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


