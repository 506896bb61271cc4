"""A real Synapse homeserver, built in-process, for twisted.trial tests.

Synapse's own ``tests`` package is not in its wheel, so this is our own: it
follows Synapse's start-up path (``HomeServerConfig.parse_config_dict`` ->
``create_homeserver`` -> ``setup`` -> ``start``) on the real reactor, with the
module loaded from ``homeserver.yaml``-style config, on SQLite (a file in a
temporary directory) or PostgreSQL (a fresh database per test case).
"""

import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

from synapse.server import HomeServer
from twisted.internet import defer
from twisted.trial import unittest

from synapse_nidstate.commands.homeserver import in_logcontext
from synapse_nidstate.demo.inprocess import (
    homeserver_config,
    sqlite_database,
    start_homeserver,
    stop_homeserver,
)
from synapse_nidstate.runtime.module import NidStateModule, module_for

__all__ = ["HomeserverTestCase", "in_logcontext"]

logger = logging.getLogger(__name__)

PG_HOST = os.environ.get("NIDSTATE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("NIDSTATE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("NIDSTATE_TEST_PG_USER", "postgres")

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


def temporary_directory(case: unittest.TestCase, prefix: str) -> str:
    """A new directory, removed with what it holds when ``case`` ends (its
    cleanups run last-registered first: after the servers started in it stop)."""
    path = tempfile.mkdtemp(prefix=prefix)
    case.addCleanup(shutil.rmtree, path, True)
    return path


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

    def postgres_database_name(self) -> str:
        """A fresh PostgreSQL database, dropped after the test; without a server the
        test is skipped, or fails under CI."""
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL at {PG_HOST}:{PG_PORT} is required in CI: {problem}")
            raise unittest.SkipTest(f"PostgreSQL at {PG_HOST}:{PG_PORT}: {problem}")
        name = create_postgres_database()
        self.addCleanup(drop_postgres_database, name)
        return name

    def database_config(self) -> dict[str, Any]:
        if self.engine == "sqlite":
            return sqlite_database(temporary_directory(self, "nidstate-sqlite-"))
        name = self.postgres_database_name()
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
        data_dir = temporary_directory(self, "nidstate-hs-")
        if (
            os.environ.get("NIDSTATE_TEST_RECLAIM") == "eager"
            and module_config is not None
            and module_config.get("mode") == "serve"
            and "reclaim" not in module_config
            and "databases" not in (extra_config or {})
        ):
            # The whole suite with eager reclaim: every test's serving homeserver
            # runs with an (almost) empty state_groups_state. Not where a test
            # sets reclaim itself, nor with a separate state database (reclaim
            # refuses it).
            module_config = {**module_config, "reclaim": {"eager": True}}
        config_dict = homeserver_config(
            data_dir,
            database if database is not None else self.database_config(),
            module_config,
        )
        if "databases" in (extra_config or {}):
            del config_dict["database"]
        config_dict.update(extra_config or {})
        hs = await start_homeserver(config_dict, data_dir)
        self.addCleanup(self._shutdown, hs)
        return hs

    async def stop_homeserver(self, hs: HomeServer) -> None:
        """Shut a homeserver down before the test ends (e.g. to restart on its database)."""
        await self._shutdown(hs)

    def _shutdown(self, hs: HomeServer) -> "defer.Deferred[None]":
        module = module_for(hs)
        if module is not None and not hs._is_shutdown:
            # Summed over a run by the closing note's figures (grep the log).
            logger.info("synapse-nidstate counters %s", json.dumps(module.stats.as_dict()))
        return in_logcontext(stop_homeserver, "shutdown")(hs)

    @staticmethod
    def module(hs: HomeServer) -> NidStateModule:
        module = module_for(hs)
        assert module is not None, "synapse-nidstate is not loaded"
        return module


class SqlStatements(logging.Handler):
    """The statements Synapse's transactions run meanwhile (its SQL debug log);
    with ``transaction``, only those of the transactions of that name (Synapse's
    background processes run theirs on other threads meanwhile)."""

    def __init__(self, transaction: str | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.sql: list[str] = []
        self._transaction = transaction
        self._logger = logging.getLogger("synapse.storage.SQL")

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg != "[SQL] {%s} %s":  # not its values, time or failure
            return
        name, sql = record.args  # type: ignore[misc]
        if self._transaction is None or str(name).startswith(self._transaction):
            self.sql.append(" ".join(str(sql).split()))

    def __enter__(self) -> "SqlStatements":
        self._level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
