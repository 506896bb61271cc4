"""Every way Synapse accepts to name its database works with the module.

SQLite: a file, and ``:memory:`` (what Synapse's own test harness uses; one
connection, ``cp_max: 1``, since every in-memory connection is its own database).
PostgreSQL: ``database`` or psycopg2's ``dbname``, a DSN string, a unix socket.
Each homeserver serves lookups from the mirror and answers as Synapse does.
"""

import os
from typing import Any

from synapse.server import HomeServer
from twisted.trial import unittest

from synapse_nidstate.storage.schema import schema_files
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    HomeserverTestCase,
    in_logcontext,
)
from tests.scenarios import build_history, compare_room, filters_for, room_event_ids

#: Where PostgreSQL's unix socket is on Debian (NIDSTATE_TEST_PG_SOCKET_DIR overrides).
PG_SOCKET_DIR = os.environ.get("NIDSTATE_TEST_PG_SOCKET_DIR", "/var/run/postgresql")


class DatabaseSettingsTests(HomeserverTestCase):
    async def _serves(self, database: dict[str, Any]) -> HomeServer:
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        history = await build_history(hs, messages_per_room=2)
        filters = filters_for(hs, history.users)
        compared = 0
        for room_id in history.rooms:
            compared += await compare_room(self, hs, room_id, filters)
        self.assertGreater(compared, 50)
        stats = self.module(hs).stats
        self.assertEqual(stats.mirror.write_failures, 0)
        self.assertEqual(stats.mirror.unprepared, 0)
        # Synapse's lookups go to the mirror.
        controller = hs.get_storage_controllers().state
        for room_id in history.rooms:
            event_ids, _ = await room_event_ids(hs, room_id)
            await controller.get_state_ids_for_events(event_ids)
        self.assertGreater(stats.lookups.served, 0)
        self.assertEqual(stats.lookups.fallback, 0)
        return hs

    @in_logcontext
    async def test_sqlite_in_memory(self) -> None:
        hs = await self._serves(
            {"name": "sqlite3", "args": {"database": ":memory:", "cp_min": 1, "cp_max": 1}}
        )
        engine = hs.get_datastores().main.database_engine
        self.assertEqual(self.module(hs).schema_version, schema_files(engine)[-1][0])

    @in_logcontext
    async def test_postgres_dbname(self) -> None:
        name = self.postgres_database_name()
        await self._serves(
            {
                "name": "psycopg2",
                "args": {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "dbname": name},
            }
        )

    @in_logcontext
    async def test_postgres_database(self) -> None:
        name = self.postgres_database_name()
        await self._serves(
            {
                "name": "psycopg2",
                "args": {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "database": name},
            }
        )

    @in_logcontext
    async def test_postgres_dsn(self) -> None:
        name = self.postgres_database_name()
        await self._serves(
            {
                "name": "psycopg2",
                "args": {"dsn": f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={name}"},
            }
        )

    @in_logcontext
    async def test_postgres_unix_socket(self) -> None:
        if not os.path.exists(os.path.join(PG_SOCKET_DIR, f".s.PGSQL.{PG_PORT}")):
            raise unittest.SkipTest(f"no PostgreSQL socket in {PG_SOCKET_DIR}")
        name = self.postgres_database_name()
        await self._serves(
            {
                "name": "psycopg2",
                "args": {"host": PG_SOCKET_DIR, "user": PG_USER, "dbname": name},
            }
        )
