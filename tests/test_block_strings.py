"""The strings stored beside blocks (schema 7): filled by the migration and
the background job, read by whole reads instead of a probe per NID, checked,
and never needed for an answer. Both engines."""

from typing import Any

from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.types.state import StateFilter
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from synapse_nidstate import algebra
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.storage.block_strings import MIN_ENTRIES
from synapse_nidstate.storage.common import STATE_KEYS
from synapse_nidstate.storage.flat_blocks import FlatBlocks
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import compare_room, filters_for, room_event_ids
from tests.test_read_faults import last_event_snapshot
from tests.test_reclaim import SERVE, forget_caches, wrapped_group_digest

ODD_KEY = "a state key\nwith a newline"


async def big_room(hs: HomeServer) -> tuple[Driver, str, str]:
    """A room whose state outgrows a block: 150 members, a custom key with a
    newline, and enough changes to compact and merge; (driver, alice, room)."""
    d = Driver(hs)
    alice = await d.register("alice")
    room_id = await d.create_room(alice, "public_chat")
    await d.send(alice, room_id, "x.custom", {"odd": True}, ODD_KEY)
    for i in range(150):
        user = await d.register(f"user{i}")
        await d.membership(user, user, room_id, "join")
    for i in range(75):
        await d.send(alice, room_id, EventTypes.Topic, {"topic": f"topic {i}"}, "")
    return d, alice, room_id


async def block_rows(hs: HomeServer) -> list[tuple[int, int, str | None]]:
    """(block NID, entry count, stored strings) of every block."""

    def read_txn(txn: Any) -> list[tuple[int, int, str | None]]:
        txn.execute("SELECT block_nid, entry_count, strings FROM nidstate_blocks")
        return txn.fetchall()

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_blocks", read_txn)


async def odd_key_blocks(hs: HomeServer) -> set[int]:
    """The blocks of 16 entries or more holding an entry with :data:`ODD_KEY`."""

    def read_txn(txn: Any) -> set[int]:
        txn.execute("SELECT state_key_nid FROM nidstate_state_keys WHERE state_key = ?", (ODD_KEY,))
        (key_nid,) = txn.fetchone()
        txn.execute(
            f"SELECT block_nid, entries FROM nidstate_blocks WHERE entry_count >= {MIN_ENTRIES}"
        )
        return {
            nid
            for nid, data in txn.fetchall()
            if any(s == key_nid for _, s, _ in algebra.unpack_block(data))
        }

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_odd", read_txn)


async def entries_without_strings(hs: HomeServer, snapshot_nid: int) -> int:
    """How many entries the blocks of a snapshot that carry no strings hold."""

    def read_txn(txn: Any) -> int:
        txn.execute(
            "SELECT block_nids FROM nidstate_snapshots WHERE snapshot_nid = ?", (snapshot_nid,)
        )
        blocks = set(algebra.unpack_nids(txn.fetchone()[0]))
        txn.execute("SELECT block_nid, entry_count, strings FROM nidstate_blocks")
        return sum(n for nid, n, strings in txn.fetchall() if nid in blocks and not strings)

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_nid", read_txn)


class BlockStringsTests:
    @in_logcontext
    async def test_filled_once_resumably_and_read_by_whole_reads(self) -> None:
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        _, alice, room_id = await big_room(hs)
        self.assertGreaterEqual(module.stats.mirror.compactions, 1)  # type: ignore[attr-defined]
        # The live mirror's big blocks got their strings once their events'
        # transactions committed, in the background.
        for _ in range(100):
            big = [(nid, n, s) for nid, n, s in await block_rows(hs) if n >= MIN_ENTRIES]
            if all(s is not None for _, _, s in big):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(big)  # type: ignore[attr-defined]
        self.assertEqual([nid for nid, _, s in big if s is None], [])  # type: ignore[attr-defined]
        counted = module.stats.block_strings
        self.assertEqual((counted.live, counted.live_failures), (len(big), 0))  # type: ignore[attr-defined]

        # Blocks written before schema 7 (none filled), then filled as the
        # migration does, a page at a time (resumable: a filled block is not
        # selected again).
        await hs.get_datastores().main.db_pool.runInteraction(
            "nidstate_test_unfill", lambda txn: txn.execute("UPDATE nidstate_blocks SET strings = NULL")
        )
        pages = []
        while filled := await module.migrator.fill_block_strings(max_pages=1):
            pages.append(filled)
        self.assertEqual(sum(pages), len(big))  # type: ignore[attr-defined]
        self.assertEqual(counted.by_migration, len(big))  # type: ignore[attr-defined]
        rows = await block_rows(hs)
        for nid, entries, strings in rows:
            if entries < MIN_ENTRIES:
                self.assertIsNone(strings, nid)  # type: ignore[attr-defined]
            else:
                self.assertIsNotNone(strings, nid)  # type: ignore[attr-defined]
        # A block holding the key with a newline is stored without strings
        # (its strings are read by NID); the others with theirs.
        odd = await odd_key_blocks(hs)
        self.assertTrue(odd)  # type: ignore[attr-defined]
        for nid, entries, strings in rows:
            if entries >= MIN_ENTRIES:
                self.assertEqual(strings == "", nid in odd, nid)  # type: ignore[attr-defined]

        # A cold whole read takes its strings from the blocks: of the latest
        # state's event IDs, those of the blocks without strings alone are
        # read by NID.
        by_nid: list[int] = []  # per read of strings by NID: event IDs read
        strings_read = module.store._strings_of_nids_read

        def counting(txn, types, keys, events, fill=True, known=None):  # type: ignore[no-untyped-def]
            beside = known[2] if known is not None else {}
            by_nid.append(sum(1 for e in events if e not in beside))
            return strings_read(txn, types, keys, events, fill, known)

        self.patch(module.store, "_strings_of_nids_read", counting)  # type: ignore[attr-defined]
        event_ids, _ = await room_event_ids(hs, room_id)
        latest = event_ids[-1:]
        forget_caches(hs, module)
        expected = await module.lookups.native_state_ids(latest, StateFilter.all())
        by_nid.clear()
        self.assertEqual(  # type: ignore[attr-defined]
            await module.lookups.mirrored_state_ids(latest, StateFilter.all()), expected
        )
        _, _, snapshot_nid = await last_event_snapshot(hs, room_id)
        without = await entries_without_strings(hs, snapshot_nid)
        self.assertGreater(len(expected[latest[0]]), 150)  # type: ignore[attr-defined]
        self.assertLessEqual(sum(by_nid), without)  # type: ignore[attr-defined]
        self.assertLess(sum(by_nid), len(expected[latest[0]]))  # type: ignore[attr-defined]
        self.assertIn(("x.custom", ODD_KEY), expected[latest[0]])  # type: ignore[attr-defined]

        # Every event, filter and group, cold, as Synapse answers.
        forget_caches(hs, module)
        await compare_room(self, hs, room_id, filters_for(hs, [alice, alice, alice]))
        forget_caches(hs, module)
        groups = await wrapped_group_digest(hs)
        self.assertTrue(groups)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_a_whole_read_takes_the_strings_of_cached_blocks(self) -> None:
        # The blocks cache keeps NIDs only. A whole read whose big blocks are
        # cached (its answer evicted meanwhile) takes their stored strings in
        # its blocks statement, as a cold read does, instead of reading every
        # entry's strings by NID: at HQ scale that was 3.5x slower.
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        _, _, room_id = await big_room(hs)
        await module.migrator.fill_block_strings()
        event_ids, _ = await room_event_ids(hs, room_id)
        latest = event_ids[-1:]
        forget_caches(hs, module)
        expected = await module.lookups.native_state_ids(latest, StateFilter.all())
        forget_caches(hs, module)
        # Resolved in the strings stored beside its big blocks, the read never
        # makes those blocks the algebra's tuples (most of its peak at HQ scale).
        made: list[int] = []
        missing = FlatBlocks.__missing__

        def counting_blocks(blocks: FlatBlocks, block_nid: int) -> Any:
            made.append(block_nid)
            return missing(blocks, block_nid)

        self.patch(FlatBlocks, "__missing__", counting_blocks)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await module.lookups.mirrored_state_ids(latest, StateFilter.all()), expected
        )
        with_strings = {nid for nid, _, strings in await block_rows(hs) if strings}
        self.assertTrue(with_strings)  # type: ignore[attr-defined]
        self.assertEqual(with_strings.intersection(made), set())  # type: ignore[attr-defined]
        _, _, snapshot_nid = await last_event_snapshot(hs, room_id)
        store = module.store
        block_nids = store._snapshot_blocks.get(snapshot_nid)[0]
        big = [b for b in block_nids if len(store._blocks.get(b, ())) >= 3 * MIN_ENTRIES]
        self.assertTrue(big)  # type: ignore[attr-defined]

        by_nid: list[int] = []  # per read of strings by NID: event IDs read
        strings_read = store._strings_of_nids_read

        def counting(txn, types, keys, events, fill=True, known=None):  # type: ignore[no-untyped-def]
            beside = known[2] if known is not None else {}
            by_nid.append(sum(1 for e in events if e not in beside))
            return strings_read(txn, types, keys, events, fill, known)

        self.patch(store, "_strings_of_nids_read", counting)  # type: ignore[attr-defined]
        for _ in range(2):
            # The answers forgotten, the blocks and block lists kept.
            store._resolved.clear()
            store._resolved_index.clear()
            store._split.invalidate_all()
            by_nid.clear()
            self.assertEqual(  # type: ignore[attr-defined]
                await module.lookups.mirrored_state_ids(latest, StateFilter.all()), expected
            )
            self.assertTrue(all(b in store._blocks.cache for b in big))  # type: ignore[attr-defined]
            # Of the event IDs, those of the blocks without strings alone
            # were read by NID (in the transaction that follows the attempt
            # from the caches alone, which misses).
            self.assertLessEqual(  # type: ignore[attr-defined]
                by_nid[-1], await entries_without_strings(hs, snapshot_nid)
            )
            self.assertLess(by_nid[-1], len(expected[latest[0]]))  # type: ignore[attr-defined]
            # The attempt from the caches alone missed a big block's event
            # IDs before it resolved anything, and read no string.
            self.assertEqual(len(by_nid), 1)  # type: ignore[attr-defined]

        # Every string of the state cached: the caches alone answer, no
        # transaction (the big blocks resolved by NID).
        def all_strings_txn(txn: Any) -> list[list[tuple[int, str]]]:
            txn.execute("SELECT state_key_nid, state_key FROM nidstate_state_keys")
            keys = txn.fetchall()
            txn.execute("SELECT event_nid, event_id FROM nidstate_events")
            return [keys, txn.fetchall()]

        keys, events = await hs.get_datastores().main.db_pool.runInteraction(
            "nidstate_test_strings", all_strings_txn
        )
        for nid, key in keys:
            store._nid_strings[STATE_KEYS].set(nid, key)
        for nid, event_id in events:
            store._event_ids.set(nid, event_id)
        store._resolved.clear()
        store._resolved_index.clear()
        store._split.invalidate_all()
        by_nid.clear()
        self.patch(store.db_pool, "runInteraction", None)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            await module.lookups.mirrored_state_ids(latest, StateFilter.all()), expected
        )
        self.assertEqual(len(by_nid), 1)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_strings_that_do_not_fit_their_block_are_a_fault(self) -> None:
        # Stored strings for fewer entries than the block has: the read fails
        # (never an answer from them) and Synapse's rows answer instead.
        hs = await self.make_homeserver(SERVE)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        _, _, room_id = await big_room(hs)
        await module.migrator.fill_block_strings()

        def corrupt_txn(txn: Any) -> None:
            txn.execute(
                "SELECT block_nid, strings FROM nidstate_blocks"
                " WHERE strings IS NOT NULL AND strings <> ''"
            )
            for nid, strings in txn.fetchall():
                shorter = strings.rsplit("\n", 1)[0]
                txn.execute(
                    "UPDATE nidstate_blocks SET strings = ? WHERE block_nid = ?", (shorter, nid)
                )

        await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_corrupt", corrupt_txn)
        event_ids, _ = await room_event_ids(hs, room_id)
        forget_caches(hs, module)
        expected = await module.lookups.native_state_ids(event_ids[-1:], StateFilter.all())
        failed = module.stats.lookups.failed
        forget_caches(hs, module)
        answer = await hs.get_storage_controllers().state.get_state_ids_for_event(event_ids[-1])
        self.assertEqual(answer, expected[event_ids[-1]])  # type: ignore[attr-defined]
        self.assertGreater(module.stats.lookups.failed, failed)  # type: ignore[attr-defined]


class SqliteBlockStringsTests(BlockStringsTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresBlockStringsTests(BlockStringsTests, HomeserverTestCase):
    engine = "postgres"

    @in_logcontext
    async def test_strings_are_compressed_by_lz4(self) -> None:
        """pglz stores the strings whole (their event IDs do not save it a
        quarter); where the server has lz4 the column takes it and keeps what
        it saves."""
        hs = await self.make_homeserver(SERVE)
        module = self.module(hs)
        await big_room(hs)
        await module.migrator.fill_block_strings()

        def read_txn(txn: Any) -> tuple[bool, list[tuple[str | None, int, int]]]:
            txn.execute(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
                " WHERE name = 'default_toast_compression'"
            )
            (supported,) = txn.fetchone()
            txn.execute(
                "SELECT pg_column_compression(strings), octet_length(strings),"
                " pg_column_size(strings) FROM nidstate_blocks WHERE strings <> ''"
            )
            return supported, txn.fetchall()

        supported, values = await hs.get_datastores().main.db_pool.runInteraction(
            "nidstate_test_compression", read_txn
        )
        if not supported:
            raise SkipTest("this PostgreSQL server has no lz4")
        # A value is compressed once its row passes PostgreSQL's TOAST
        # threshold (about 2 kB): those are, here, and by lz4 alone.
        compressed = [(length, stored) for method, length, stored in values if method]
        self.assertEqual({method for method, _, _ in values} - {None}, {"lz4"}, values)
        self.assertTrue(compressed, values)
        for length, stored in compressed:
            self.assertLess(stored, length)
