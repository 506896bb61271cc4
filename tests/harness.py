"""A real Synapse homeserver, built in-process, for twisted.trial tests.

Synapse's own ``tests`` package is not in its wheel, so this is our own: it
follows Synapse's start-up path (``HomeServerConfig.parse_config_dict`` ->
``create_homeserver`` -> ``setup`` -> ``start``) on the real reactor, with the
module loaded from ``homeserver.yaml``-style config, on SQLite (a file in a
temporary directory) or PostgreSQL (a fresh database per test case).
"""

import functools
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import defer, reactor
from twisted.trial import unittest

import synapse.app.homeserver as synapse_app
from synapse.config.homeserver import HomeServerConfig
from synapse.logging.context import LoggingContext, run_in_background
from synapse.server import HomeServer

from synapse_nidstate.module import NidStateModule, module_for

SERVER_NAME = "nidstate.test"
SIGNING_KEY = "ed25519 a_lPym qvioDNmfExFBRPgdTU+wtFYKq4JfwFRv7sYVgWvmgJg"

PG_HOST = os.environ.get("NIDSTATE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("NIDSTATE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("NIDSTATE_TEST_PG_USER", "postgres")

T = TypeVar("T")


def in_logcontext(fn: Callable[..., Awaitable[T]]) -> Callable[..., "defer.Deferred[T]"]:
    """Run an async test method the way Synapse runs request handlers.

    Synapse expects work to start in a LoggingContext and the reactor to run in
    the sentinel context: ``run_in_background`` gives exactly that.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> "defer.Deferred[T]":
        with LoggingContext(name=fn.__name__, server_name=SERVER_NAME):
            return run_in_background(fn, *args, **kwargs)

    return wrapper


def homeserver_config(
    data_dir: str, database: dict[str, Any], module_config: dict[str, Any] | None
) -> dict[str, Any]:
    """A minimal homeserver.yaml (as a dict) for an in-process server with no listeners."""
    config: dict[str, Any] = {
        "server_name": SERVER_NAME,
        "signing_key": SIGNING_KEY,
        "trusted_key_servers": [],
        "report_stats": False,
        "macaroon_secret_key": "nidstate-test-macaroon",
        "registration_shared_secret": "nidstate-test-secret",
        "database": database,
        "media_store_path": os.path.join(data_dir, "media"),
        "listeners": [],
        "federation_sender_instances": [],
        "enable_metrics": False,
        "rc_message": {"per_second": 100000, "burst_count": 100000},
        "rc_room_creation": {"per_second": 100000, "burst_count": 100000},
        "rc_joins": {
            "local": {"per_second": 100000, "burst_count": 100000},
            "remote": {"per_second": 100000, "burst_count": 100000},
        },
        "rc_invites": {
            "per_room": {"per_second": 100000, "burst_count": 100000},
            "per_user": {"per_second": 100000, "burst_count": 100000},
            "per_issuer": {"per_second": 100000, "burst_count": 100000},
        },
        "modules": [],
    }
    if module_config is not None:
        config["modules"] = [
            {"module": "synapse_nidstate.NidStateModule", "config": module_config}
        ]
    return config


def postgres_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    import psycopg2

    try:
        psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
        ).close()
    except psycopg2.Error as e:
        return str(e).strip()
    return None


def create_postgres_database() -> str:
    import psycopg2

    name = f"nidstate_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            # Synapse refuses a database whose collation is not C.
            cur.execute(
                f"CREATE DATABASE {name} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
            )
    finally:
        conn.close()
    return name


def drop_postgres_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


class HomeserverTestCase(unittest.TestCase):
    """Base class: ``engine`` is "sqlite" or "postgres"; ``module_config`` None disables the module."""

    engine = "sqlite"
    module_config: dict[str, Any] | None = {"mode": "shadow"}
    timeout = 300

    def database_config(self) -> dict[str, Any]:
        if self.engine == "sqlite":
            data_dir = tempfile.mkdtemp(prefix="nidstate-sqlite-")
            return {
                "name": "sqlite3",
                "args": {"database": os.path.join(data_dir, "homeserver.db")},
            }
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL at {PG_HOST}:{PG_PORT} is required in CI: {problem}")
            raise unittest.SkipTest(f"PostgreSQL at {PG_HOST}:{PG_PORT}: {problem}")
        name = create_postgres_database()
        self.addCleanup(drop_postgres_database, name)
        return {
            "name": "psycopg2",
            "args": {
                "host": PG_HOST,
                "port": PG_PORT,
                "user": PG_USER,
                "database": name,
                "cp_min": 1,
                "cp_max": 5,
            },
        }

    async def make_homeserver(
        self,
        module_config: dict[str, Any] | None = None,
        database: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> HomeServer:
        """Build, set up and start a homeserver; it is shut down after the test."""
        data_dir = tempfile.mkdtemp(prefix="nidstate-hs-")
        config_dict = homeserver_config(
            data_dir,
            database if database is not None else self.database_config(),
            module_config,
        )
        config_dict.update(extra_config or {})
        config = HomeServerConfig()
        config.parse_config_dict(config_dict, config_dir_path=data_dir, data_dir_path=data_dir)
        hs = synapse_app.create_homeserver(config, reactor=reactor)
        hs.setup()
        self.addCleanup(self._shutdown, hs)
        await synapse_app.start(hs, freeze=False)
        return hs

    async def stop_homeserver(self, hs: HomeServer) -> None:
        """Shut a homeserver down before the test ends (e.g. to restart on its database)."""
        await self._shutdown(hs)

    def _shutdown(self, hs: HomeServer) -> "defer.Deferred[None]":
        async def shutdown() -> None:
            if hs._is_shutdown:
                return
            await hs.shutdown()
            # Synapse's background loops leave sleeps behind; they belong to
            # the server just shut down.
            for call in reactor.getDelayedCalls():
                if call.active():
                    call.cancel()

        with LoggingContext(name="shutdown", server_name=SERVER_NAME):
            return run_in_background(shutdown)

    @staticmethod
    def module(hs: HomeServer) -> NidStateModule:
        module = module_for(hs)
        assert module is not None, "synapse-nidstate is not loaded"
        return module
