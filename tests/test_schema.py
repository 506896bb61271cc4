"""The module's schema: upgrades between versions, and a database newer than the code."""

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine
from synapse.storage.prepare_database import get_statements
from synapse.types.state import StateFilter

from synapse_nidstate import algebra
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.runtime import migration
from synapse_nidstate.storage.schema import (
    apply_schema_txn,
    current_version_txn,
    schema_dir,
    schema_files,
)
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import build_history, compare_room, filters_for, room_event_ids


def _rows(txn: LoggingTransaction, sql: str, *args: object) -> list[tuple]:
    txn.execute(sql, args)
    return txn.fetchall()


class SchemaTests:
    @in_logcontext
    async def test_upgrade_from_schema_1_rebuilds_the_mirror(self) -> None:
        database = self.database_config()
        hs = await self.make_homeserver(None, database=database)
        history = await build_history(hs)
        db_pool = hs.get_datastores().main.db_pool

        def schema_1_txn(txn: LoggingTransaction) -> None:
            # What a release with schema 1 left: its tables, a mirrored event
            # (int64-packed rows), migration progress, interned strings.
            self.assertEqual(apply_schema_txn(txn, up_to=1), 1)
            txn.execute(
                "INSERT INTO nidstate_events (event_id, room_nid, type_nid, state_key_nid,"
                " snapshot_nid, rejected, stream_ordering) VALUES ('$old', 1, 1, 1, 1, FALSE, 1)"
            )
            txn.execute(
                "INSERT INTO nidstate_snapshots (room_nid, content_hash, block_nids)"
                " VALUES (1, ?, ?)",
                (bytearray(32), bytearray(8)),
            )
            txn.execute(
                "INSERT INTO nidstate_meta (key, value)"
                " VALUES ('migrate_high_stream_ordering', '10')"
            )
            txn.execute("INSERT INTO nidstate_state_keys (state_key) VALUES ('@kept:test')")

        await db_pool.runInteraction("schema_1", schema_1_txn)
        await self.stop_homeserver(hs)

        # The new release starts: schema 2 drops the derived rows, keeps strings.
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        module = self.module(hs)
        latest = schema_files(hs.get_datastores().main.database_engine)[-1][0]
        self.assertEqual(module.schema_version, latest)
        db_pool = hs.get_datastores().main.db_pool

        def after_txn(txn: LoggingTransaction) -> tuple:
            return (
                current_version_txn(txn),
                _rows(txn, "SELECT COUNT(*) FROM nidstate_events"),
                _rows(txn, "SELECT COUNT(*) FROM nidstate_snapshots"),
                _rows(txn, "SELECT key FROM nidstate_meta WHERE key LIKE ?", "migrate%"),
                _rows(txn, "SELECT state_key FROM nidstate_state_keys WHERE state_key = '@kept:test'"),
            )

        version, events, snapshots, progress, kept = await db_pool.runInteraction("after", after_txn)
        self.assertEqual(version, latest)
        self.assertEqual(events, [(0,)])
        self.assertEqual(snapshots, [(0,)])
        self.assertEqual(progress, [])
        self.assertEqual(kept, [("@kept:test",)])

        # Until migrated, lookups fall back to Synapse; then the mirror answers.
        room_id = history.rooms[0]
        event_ids, _ = await room_event_ids(hs, room_id)
        self.assertEqual(await module.lookups.mirrored_state_ids(event_ids, StateFilter.all()), {})
        controller = hs.get_storage_controllers().state
        self.assertEqual(
            await controller.get_state_ids_for_events(event_ids),
            await module.lookups.native_state_ids(event_ids, StateFilter.all()),
        )
        await module.migrator.run()
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            self.assertGreater(await compare_room(self, hs, room_id, filters), 0)

    @in_logcontext
    async def test_upgrade_from_schema_3_keeps_state_events_and_their_nids(self) -> None:
        database = self.database_config()
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        history = await build_history(hs)
        db_pool = hs.get_datastores().main.db_pool
        engine = hs.get_datastores().main.database_engine
        (create,) = [
            statement
            for statement in get_statements((schema_dir(engine) / "02_compact.sql").open())
            if statement.startswith("CREATE TABLE nidstate_events ")
        ]

        def schema_3_txn(txn: LoggingTransaction) -> dict[str, int]:
            # What a release with schema 3 left: nidstate_events with a row per
            # event persisted with state and its snapshot pointer, beside the
            # interned state events (whose NIDs the blocks hold).
            interned = dict(_rows(txn, "SELECT event_id, event_nid FROM nidstate_events"))
            txn.execute("DROP TABLE nidstate_events")
            txn.execute(create)
            txn.executemany(
                "INSERT INTO nidstate_events (event_nid, event_id, room_nid) VALUES (?, ?, 1)",
                [(nid, event_id) for event_id, nid in interned.items()],
            )
            if isinstance(engine, PostgresEngine):
                txn.execute(
                    "SELECT setval('nidstate_events_event_nid_seq', ?)", (max(interned.values()),)
                )
            txn.execute(
                "INSERT INTO nidstate_events (event_id, room_nid, snapshot_nid)"
                " SELECT esg.event_id, 1, g.snapshot_nid FROM event_to_state_groups AS esg"
                " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
                " WHERE esg.event_id NOT IN (SELECT event_id FROM nidstate_events)"
            )
            txn.execute(
                "UPDATE nidstate_events SET snapshot_nid = (SELECT g.snapshot_nid"
                " FROM event_to_state_groups AS esg JOIN nidstate_state_groups AS g"
                " ON g.state_group = esg.state_group WHERE esg.event_id = nidstate_events.event_id)"
            )
            # Schema 5's columns were not there either, nor schema 6's indexes
            # (nidstate_events' went with the table).
            txn.execute("ALTER TABLE nidstate_blocks DROP COLUMN first_key")
            txn.execute("ALTER TABLE nidstate_blocks DROP COLUMN last_key")
            txn.execute("DROP INDEX nidstate_state_groups_snapshot")
            # Nor schema 7's strings beside the blocks.
            txn.execute("DROP INDEX nidstate_blocks_without_strings")
            txn.execute("ALTER TABLE nidstate_blocks DROP COLUMN strings")
            # Nor schema 8's pieces.
            txn.execute("DROP TABLE nidstate_block_pieces")
            txn.execute("ALTER TABLE nidstate_blocks DROP COLUMN pieces")
            txn.execute("UPDATE nidstate_meta SET value = '3' WHERE key = 'schema_version'")
            return interned

        interned = await db_pool.runInteraction("schema_3", schema_3_txn)
        rows_before = await db_pool.runInteraction(
            "count", lambda txn: _rows(txn, "SELECT COUNT(*) FROM nidstate_events")[0][0]
        )
        self.assertGreater(rows_before, len(interned))
        await self.stop_homeserver(hs)

        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        self.module(hs)  # the module started (schema applied)
        db_pool = hs.get_datastores().main.db_pool
        after = await db_pool.runInteraction(
            "after", lambda txn: dict(_rows(txn, "SELECT event_id, event_nid FROM nidstate_events"))
        )
        non_state = await db_pool.runInteraction(
            "non_state",
            lambda txn: _rows(
                txn,
                "SELECT COUNT(*) FROM nidstate_events AS n JOIN events AS e"
                " ON e.event_id = n.event_id WHERE e.state_key IS NULL",
            )[0][0],
        )
        # Only state events are left (a rejected one no block names may stay),
        # with the NIDs their blocks name ...
        self.assertEqual(non_state, 0)
        self.assertEqual({e: after[e] for e in interned if e in after}, interned)
        self.assertLess(len(after), rows_before)
        # ... and every event is still answered from the mirror, equal to Synapse.
        filters = filters_for(hs, history.users)
        for room_id in history.rooms:
            self.assertGreater(await compare_room(self, hs, room_id, filters), 0)
        # A state event interned now gets a NID above every earlier one.
        driver = Driver(hs)
        event = await driver.send(
            history.users[0], history.rooms[0], "m.room.topic", {"topic": "after 4"}, ""
        )
        nid = await db_pool.runInteraction(
            "nid",
            lambda txn: _rows(
                txn, "SELECT event_nid FROM nidstate_events WHERE event_id = ?", event.event_id
            )[0][0],
        )
        self.assertGreater(nid, max(interned.values()))
        await compare_room(self, hs, history.rooms[0], filters)

        # Schema 5: the blocks written before it have no key range (every
        # lookup reads them, and answered exactly above) until the migration,
        # once the history is done, gives each the range of what it holds.
        def ranges_txn(txn: LoggingTransaction) -> list[tuple]:
            return _rows(txn, "SELECT entries, first_key, last_key FROM nidstate_blocks")

        unfilled = [r for r in await db_pool.runInteraction("ranges", ranges_txn) if r[1] is None]
        self.assertGreater(len(unfilled), 10)
        self.patch(migration, "KEY_RANGE_PAGE", 7)  # several pages
        await self.module(hs).migrator.run()
        for entries, first_key, last_key in await db_pool.runInteraction("ranges", ranges_txn):
            block = algebra.unpack_block(bytes(entries))
            self.assertEqual(
                (first_key, last_key),
                algebra.block_key_range(block) or (0, algebra.MAX_KEY_NUMBER),
            )
        for room_id in history.rooms:
            await compare_room(self, hs, room_id, filters)
        # Schema 8: every block counted its pieces (none this small).
        self.assertEqual(
            await db_pool.runInteraction(
                "pieces",
                lambda txn: _rows(txn, "SELECT COUNT(*) FROM nidstate_blocks WHERE pieces IS NULL"),
            ),
            [(0,)],
        )

        # Schema 6: the indexes the purges use.
        def indexes_txn(txn: LoggingTransaction) -> set[str]:
            if isinstance(engine, PostgresEngine):
                sql = "SELECT indexname FROM pg_indexes"
            else:
                sql = "SELECT name FROM sqlite_master WHERE type = 'index'"
            return {row[0] for row in _rows(txn, sql)}

        self.assertLessEqual(
            {"nidstate_state_groups_snapshot", "nidstate_events_room"},
            await db_pool.runInteraction("indexes", indexes_txn),
        )

    @in_logcontext
    async def test_a_newer_schema_stops_start_up(self) -> None:
        database = self.database_config()
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        await hs.get_datastores().main.db_pool.runInteraction(
            "newer",
            lambda txn: txn.execute(
                "UPDATE nidstate_meta SET value = '99' WHERE key = 'schema_version'"
            ),
        )
        await self.stop_homeserver(hs)
        with self.assertRaises(RuntimeError) as raised:
            await self.make_homeserver({"mode": "serve"}, database=database)
        self.assertIn("schema version 99", str(raised.exception))
        self.assertIn("upgrade synapse-nidstate", str(raised.exception))


    @in_logcontext
    async def test_fixed_strings_edited_by_hand_stop_start_up(self) -> None:
        """The reads take the types and the state key the schema writes with
        fixed NIDs without reading them: a database where they differ is
        refused, not read with the wrong strings."""
        database = self.database_config()
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        await hs.get_datastores().main.db_pool.runInteraction(
            "edited",
            lambda txn: txn.execute(
                "UPDATE nidstate_event_types SET event_type = 'm.room.membership'"
                " WHERE type_nid = 5"
            ),
        )
        await self.stop_homeserver(hs)
        with self.assertRaises(RuntimeError) as raised:
            await self.make_homeserver({"mode": "serve"}, database=database)
        self.assertIn("nidstate_event_types", str(raised.exception))
        self.assertIn("m.room.membership", str(raised.exception))

    @in_logcontext
    async def test_a_narrow_read_does_not_read_fixed_or_asked_strings(self) -> None:
        """A narrow read's last statement reads event IDs only: the filter's
        types and state keys came with its first (or are fixed)."""
        hs = await self.make_homeserver({"mode": "serve"})
        history = await build_history(hs)
        users = history.users
        event_ids, _ = await room_event_ids(hs, history.rooms[0])
        module = self.module(hs)
        statements: list[str] = []
        execute = LoggingTransaction.execute

        def recording(txn: LoggingTransaction, sql: str, *args: object) -> None:
            statements.append(sql)
            execute(txn, sql, *args)

        self.patch(LoggingTransaction, "execute", recording)
        for state_filter in (
            StateFilter.from_types([("m.room.member", users[0])]),
            StateFilter.from_types([("m.room.history_visibility", ""), ("m.room.member", users[1])]),
        ):
            module.store.clear_caches()
            statements.clear()
            expected = await module.lookups.native_state_ids(event_ids[-1:], state_filter)
            statements.clear()
            self.assertEqual(
                await module.lookups.mirrored_state_ids(event_ids[-1:], state_filter), expected
            )
            strings = [s for s in statements if "nidstate_event_types" in s or "nidstate_events " in s]
            self.assertTrue(strings)
            for sql in strings:
                self.assertNotIn("FROM nidstate_event_types", sql)
                self.assertNotIn("FROM nidstate_state_keys WHERE state_key_nid", sql)


class SchemaSQLiteTests(SchemaTests, HomeserverTestCase):
    engine = "sqlite"


class SchemaPostgresTests(SchemaTests, HomeserverTestCase):
    engine = "postgres"
