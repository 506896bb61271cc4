"""Big blocks' pieces (schema 8): cut, read by narrow lookups instead of the
block, checked (a lost or altered piece is refused, never a shorter answer),
and filled for blocks written before them; on both engines."""

import random
from typing import Any

from synapse.types.state import StateFilter
from twisted.trial import unittest

from synapse_nidstate import algebra
from synapse_nidstate.algebra import pieces
from synapse_nidstate.algebra.pieces import check_covers, cut_pieces, unpack_piece_checked
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.runtime import migration
from tests.harness import HomeserverTestCase, in_logcontext
from tests.scenarios import compare_room, filters_for, room_event_ids

LIMIT = algebra.KEY_NID_LIMIT


def _block(count: int, seed: int = 1, wide: bool = False) -> algebra.Block:
    rng = random.Random(seed)
    keys = sorted(rng.sample(range(1, 10 * count), count))
    event = (1 << 40) if wide else 1000
    return algebra.make_block((5 + k % 3, k, event + i) for i, k in enumerate(keys))


class PieceAlgebraTests(unittest.TestCase):
    def test_pieces_tile_the_block_and_slice_its_stored_bytes(self) -> None:
        for wide in (False, True):
            block = _block(3 * pieces.PIECE_ENTRIES + 7, wide=wide)
            packed = algebra.pack_block(block)
            cut = cut_pieces(block, packed)
            self.assertEqual(len(cut), 4)
            check_covers(  # raises if they do not
                algebra.block_key_range(block),  # type: ignore[arg-type]
                len(cut),
                [(p.piece, p.first_key, p.last_key) for p in cut],
            )
            entries: list[algebra.Entry] = []
            for p in cut:
                data = packed[p.byte_start - 1 : p.byte_start - 1 + p.byte_length]
                flat = unpack_piece_checked(
                    data, p.entry_count, p.content_hash, p.first_key, p.last_key
                )
                it = iter(flat)
                in_piece = list(zip(it, it, it))
                # Every entry of the block whose key the piece covers is in it.
                held = [e for e in block if p.first_key <= algebra.key_number(e[:2]) <= p.last_key]
                self.assertEqual(in_piece, held)
                entries += in_piece
            self.assertEqual(tuple(entries), block)

    def test_small_blocks_and_blocks_without_a_range_have_none(self) -> None:
        block = _block(pieces.PIECE_ENTRIES)
        self.assertEqual(cut_pieces(block, algebra.pack_block(block)), [])
        big_nid = algebra.make_block(
            [(5, LIMIT + i, 7) for i in range(pieces.PIECE_ENTRIES + 1)]
        )
        self.assertEqual(cut_pieces(big_nid, algebra.pack_block(big_nid)), [])

    def test_a_hole_or_an_altered_slice_is_refused(self) -> None:
        block = _block(2 * pieces.PIECE_ENTRIES + 1)
        packed = algebra.pack_block(block)
        cut = cut_pieces(block, packed)
        key_range = algebra.block_key_range(block)
        assert key_range is not None
        covers = [(p.piece, p.first_key, p.last_key) for p in cut]
        for wrong in (
            covers[:-1],  # the last piece lost
            [covers[0], covers[2]],  # one in the middle
            [covers[0], (1, covers[1][1] + 1, covers[1][2]), covers[2]],  # a hole
            [covers[1], covers[0], covers[2]],  # out of order
        ):
            with self.assertRaises(algebra.AlgebraError):
                check_covers(key_range, len(cut), wrong)
        p = cut[1]
        data = bytearray(packed[p.byte_start - 1 : p.byte_start - 1 + p.byte_length])
        data[-1] ^= 1
        with self.assertRaises(algebra.AlgebraError):
            unpack_piece_checked(bytes(data), p.entry_count, p.content_hash, p.first_key, p.last_key)
        # The right bytes under another piece's cover.
        data = packed[p.byte_start - 1 : p.byte_start - 1 + p.byte_length]
        with self.assertRaises(algebra.AlgebraError):
            unpack_piece_checked(data, p.entry_count, p.content_hash, cut[0].first_key, p.last_key)


async def _keyed_room(hs: Any, keys: int) -> tuple[str, str]:
    """A room whose state holds ``keys`` custom keys, set one by one: its
    compactions' chunks are big blocks, with pieces. (alice, room)."""
    d = Driver(hs)
    alice = await d.register("alice")
    room_id = await d.create_room(alice, "private_chat")
    for i in range(keys):
        await d.send(alice, room_id, "x.custom", {"i": i}, f"key {i:04d}")
    return alice, room_id


async def _rows(hs: Any, sql: str, *args: Any) -> list[tuple]:
    def read_txn(txn: Any) -> list[tuple]:
        txn.execute(sql, args)
        return txn.fetchall()

    return await hs.get_datastores().main.db_pool.runInteraction("nidstate_test_rows", read_txn)


class BlockPiecesTests:
    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        # Pieces of 16 entries: the chunks of a room of a few hundred keys
        # are then cut as a 48,561-member room's are at 512.
        self.patch(pieces, "PIECE_ENTRIES", 16)  # type: ignore[attr-defined]

    async def _narrow_filters(self, hs: Any, alice: str) -> dict[str, StateFilter]:
        narrow = {
            name: f
            for name, f in filters_for(hs, [alice, alice, alice]).items()
            if name in ("one_member", "lazy_load", "history_visibility", "none")
        }
        for i in (0, 17, 200, 399):
            narrow[f"key {i}"] = StateFilter.from_types([("x.custom", f"key {i:04d}")])
        narrow["three keys"] = StateFilter.from_types(
            [("x.custom", f"key {i:04d}") for i in (3, 150, 390)]
        )
        narrow["unknown key"] = StateFilter.from_types([("x.custom", "key none")])
        return narrow

    @in_logcontext
    async def test_narrow_reads_take_pieces_and_answer_exactly(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        alice, room_id = await _keyed_room(hs, 400)
        module = self.module(hs)  # type: ignore[attr-defined]
        store = module.store
        [(pieced, piece_rows)] = await _rows(
            hs,
            "SELECT COUNT(*), SUM(pieces) FROM nidstate_blocks WHERE pieces > 0",
        )
        self.assertGreater(pieced, 2)
        self.assertEqual(
            (await _rows(hs, "SELECT COUNT(*) FROM nidstate_block_pieces"))[0][0], piece_rows
        )
        event_ids, _ = await room_event_ids(hs, room_id)
        latest = event_ids[-1:]
        narrow = await self._narrow_filters(hs, alice)
        pieces_read = 0
        for name, state_filter in narrow.items():
            store.clear_caches()
            expected = await module.lookups.native_state_ids(latest, state_filter)
            self.assertEqual(  # type: ignore[attr-defined]
                await module.lookups.mirrored_state_ids(latest, state_filter), expected, name
            )
            if name.startswith("key"):
                # One key: of each big block holding it, one piece, never
                # the block.
                # (The pieces cache is sized by entries: its dict counts pieces.
                # The last keys set may be in no big block yet.)
                read = len(store._pieces.cache)
                pieces_read += read
                self.assertEqual(read, len(store._piece_covers.cache), name)  # type: ignore[attr-defined]
                self.assertFalse(  # type: ignore[attr-defined]
                    [b for b in store._blocks.cache if b in store._piece_covers.cache], name
                )
                # Asked again with the answer dropped, from the caches alone.
                store._split.invalidate_all()
                self.assertEqual(  # type: ignore[attr-defined]
                    store.cached_state_for_events(latest, state_filter), expected, name
                )
        self.assertGreaterEqual(pieces_read, 3)  # type: ignore[attr-defined]
        # Every event, every filter, cold and then warm: exact.
        filters = {**filters_for(hs, [alice, alice, alice]), **narrow}
        store.clear_caches()
        await compare_room(self, hs, room_id, filters)
        await compare_room(self, hs, room_id, filters)

    @in_logcontext
    async def test_a_lost_or_altered_piece_is_refused_and_synapse_answers(self) -> None:
        faults = {
            "piece deleted": "DELETE FROM nidstate_block_pieces WHERE block_nid = ? AND piece = 1",
            "piece moved": "UPDATE nidstate_block_pieces SET byte_start = byte_start + 12"
            " WHERE block_nid = ? AND piece = 1",
            "cover widened": "UPDATE nidstate_block_pieces SET last_key = last_key + 1"
            " WHERE block_nid = ? AND piece = 1",
        }
        for fault, sql in faults.items():
            hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
            alice, room_id = await _keyed_room(hs, 150)
            module = self.module(hs)  # type: ignore[attr-defined]
            event_ids, _ = await room_event_ids(hs, room_id)
            latest = event_ids[-1:]
            [[snapshot_blocks]] = await _rows(
                hs,
                "SELECT s.block_nids FROM event_to_state_groups AS esg"
                " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
                " JOIN nidstate_snapshots AS s ON s.snapshot_nid = g.snapshot_nid"
                " WHERE esg.event_id = ?",
                latest[0],
            )
            in_snapshot = set(algebra.unpack_nids(snapshot_blocks))
            block_nid = next(
                nid
                for nid, count in await _rows(
                    hs, "SELECT block_nid, pieces FROM nidstate_blocks WHERE pieces >= 3"
                )
                if nid in in_snapshot
            )
            [(first_key, last_key)] = await _rows(
                hs,
                "SELECT first_key, last_key FROM nidstate_block_pieces"
                " WHERE block_nid = ? AND piece = 1",
                block_nid,
            )
            [(type_string,)] = await _rows(
                hs,
                "SELECT event_type FROM nidstate_event_types WHERE type_nid = ?",
                first_key // algebra.KEY_NID_LIMIT,
            )
            [(key_string,)] = await _rows(
                hs,
                "SELECT state_key FROM nidstate_state_keys WHERE state_key_nid = ?",
                first_key % algebra.KEY_NID_LIMIT,
            )
            state_filter = StateFilter.from_types([(type_string, key_string)])

            def fault_txn(txn: Any, sql: str = sql, block_nid: int = block_nid) -> None:
                txn.execute(sql, (block_nid,))

            await hs.get_datastores().main.db_pool.runInteraction("fault", fault_txn)
            module.store.clear_caches()
            failed = module.stats.lookups.failed
            expected = await module.lookups.native_state_ids(latest, state_filter)
            self.assertEqual(len(expected[latest[0]]), 1)  # type: ignore[attr-defined]
            controller = hs.get_storage_controllers().state
            self.assertEqual(  # type: ignore[attr-defined]
                await controller.get_state_ids_for_events(latest, state_filter), expected, fault
            )
            self.assertGreater(module.stats.lookups.failed, failed, fault)  # type: ignore[attr-defined]
            # A whole read does not use pieces: still the module's, exact.
            module.store.clear_caches()
            failed = module.stats.lookups.failed
            self.assertEqual(  # type: ignore[attr-defined]
                await controller.get_state_ids_for_events(latest),
                await module.lookups.native_state_ids(latest, StateFilter.all()),
            )
            self.assertEqual(module.stats.lookups.failed, failed, fault)  # type: ignore[attr-defined]
            await self.stop_homeserver(hs)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_blocks_written_before_pieces_are_read_whole_then_filled(self) -> None:
        database = self.database_config()  # type: ignore[attr-defined]
        hs = await self.make_homeserver({"mode": "serve"}, database=database)  # type: ignore[attr-defined]
        alice, room_id = await _keyed_room(hs, 200)
        module = self.module(hs)  # type: ignore[attr-defined]
        written = await _rows(
            hs,
            "SELECT block_nid, piece, first_key, last_key, byte_start, byte_length,"
            " entry_count, content_hash FROM nidstate_block_pieces ORDER BY block_nid, piece",
        )
        counts = await _rows(hs, "SELECT block_nid, pieces FROM nidstate_blocks ORDER BY block_nid")
        self.assertGreater(len(written), 10)  # type: ignore[attr-defined]

        def before_txn(txn: Any) -> None:
            # What schema 7 left: no pieces, and the column NULL.
            txn.execute("DELETE FROM nidstate_block_pieces")
            txn.execute("UPDATE nidstate_blocks SET pieces = NULL")

        await hs.get_datastores().main.db_pool.runInteraction("before", before_txn)
        module.store.clear_caches()
        filters = {
            **filters_for(hs, [alice, alice, alice]),
            **await self._narrow_filters(hs, alice),
        }
        await compare_room(self, hs, room_id, filters)
        # The next start's migration fills them, a page a transaction.
        await self.stop_homeserver(hs)  # type: ignore[attr-defined]
        self.patch(migration, "KEY_RANGE_PAGE", 7)  # type: ignore[attr-defined]
        hs = await self.make_homeserver({"mode": "serve"}, database=database)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        await module.migrator.run()
        self.assertEqual(  # type: ignore[attr-defined]
            [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in
             await _rows(
                hs,
                "SELECT block_nid, piece, first_key, last_key, byte_start, byte_length,"
                " entry_count, content_hash FROM nidstate_block_pieces ORDER BY block_nid, piece",
            )],
            [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in written],
        )
        self.assertEqual(  # type: ignore[attr-defined]
            await _rows(hs, "SELECT block_nid, pieces FROM nidstate_blocks ORDER BY block_nid"),
            counts,
        )
        module.store.clear_caches()
        await compare_room(self, hs, room_id, filters)

    @in_logcontext
    async def test_a_new_process_reads_big_blocks_whole_until_it_meets_one(self) -> None:
        """Until a process meets a big block, its narrow reads select blocks
        without their pieces; the first big block met is read whole (exact),
        and the reads after it take pieces."""
        database = self.database_config()  # type: ignore[attr-defined]
        hs = await self.make_homeserver({"mode": "serve"}, database=database)  # type: ignore[attr-defined]
        _, room_id = await _keyed_room(hs, 200)
        self.assertTrue(self.module(hs).store.big_blocks_seen)  # type: ignore[attr-defined]
        await self.stop_homeserver(hs)  # type: ignore[attr-defined]
        hs = await self.make_homeserver({"mode": "serve"}, database=database)  # type: ignore[attr-defined]
        module = self.module(hs)  # type: ignore[attr-defined]
        store = module.store
        self.assertFalse(store.big_blocks_seen)  # type: ignore[attr-defined]
        event_ids, _ = await room_event_ids(hs, room_id)
        latest = event_ids[-1:]
        state_filter = StateFilter.from_types([("x.custom", "key 0017")])
        expected = await module.lookups.native_state_ids(latest, state_filter)
        self.assertEqual(len(expected[latest[0]]), 1)  # type: ignore[attr-defined]
        for whole in (True, False):
            store.clear_caches()
            self.assertEqual(  # type: ignore[attr-defined]
                await module.lookups.mirrored_state_ids(latest, state_filter), expected
            )
            self.assertTrue(store.big_blocks_seen)  # type: ignore[attr-defined]
            self.assertEqual(not store._pieces.cache, whole)  # type: ignore[attr-defined]

    @in_logcontext
    async def test_a_purge_deletes_the_pieces_with_their_blocks(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})  # type: ignore[attr-defined]
        _, room_id = await _keyed_room(hs, 100)
        self.assertGreater(  # type: ignore[attr-defined]
            (await _rows(hs, "SELECT COUNT(*) FROM nidstate_block_pieces"))[0][0], 0
        )
        await hs.get_storage_controllers().purge_events.purge_room(room_id)
        self.assertEqual(  # type: ignore[attr-defined]
            await _rows(hs, "SELECT COUNT(*) FROM nidstate_block_pieces"), [(0,)]
        )


class SqliteBlockPiecesTests(BlockPiecesTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresBlockPiecesTests(BlockPiecesTests, HomeserverTestCase):
    engine = "postgres"
