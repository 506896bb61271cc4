"""The statement of a narrow read's blocks (``storage/narrow_statement.py``):
the event IDs it finds beside the blocks on PostgreSQL, on blocks written by
hand, and the cold reads that then need no statement for strings."""

from array import array
from typing import Any

from synapse.storage.database import LoggingTransaction

from synapse_nidstate import algebra
from synapse_nidstate.storage.narrow_statement import key_patterns, narrow_statement
from tests.harness import HomeserverTestCase, SqlStatements, in_logcontext
from tests.test_timing_alone import history_group, synapse_answer

#: NIDs far above what a test's history allocates.
BASE = 10**9
MEMBER = 5  # m.room.member's fixed type NID


def stored(entries: list[tuple[int, int, int]], wide: bool = False) -> bytes:
    """A block's bytes as ``algebra.pack_block`` stores them, or as int64s."""
    if not wide:
        return algebra.pack_block(tuple(entries))
    return bytes((algebra.encoding._TAG_INT64,)) + array("q", [n for e in entries for n in e]).tobytes()


class NarrowStatementPostgresTests(HomeserverTestCase):
    engine = "postgres"

    @in_logcontext
    async def test_event_ids_beside_the_blocks(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        db_pool = hs.get_datastores().main.db_pool
        key = BASE + 1  # the wanted member's state key NID
        event = BASE + 500
        blocks = {
            # The key's entry, aligned: found.
            BASE + 1: ([(MEMBER, BASE, BASE + 400), (MEMBER, key, event)], False, 0),
            # Its eight bytes across two entries (an event NID 5, then a
            # type NID equal to the key's NID), and no entry of the key: none.
            BASE + 2: ([(MEMBER, BASE - 1, MEMBER), (key, BASE + 2, BASE + 401)], False, 0),
            # Stored as int64s: left to the strings' statement; so is a big
            # block whose pieces' rows are missing (nothing read, nothing searched).
            BASE + 3: ([(MEMBER, key, event)], True, 0),
            BASE + 4: ([(MEMBER, key, event)], False, 2),
            # Big blocks read by pieces (below): the key's entry in the
            # second piece's slice (found), or in an int64 block's (not).
            BASE + 5: ([(MEMBER, BASE, BASE + 400), (MEMBER, key, event)], False, 2),
            BASE + 6: ([(MEMBER, BASE, BASE + 400), (MEMBER, key, event)], True, 2),
            # An int64 block whose bytes hold the key's eight at an offset
            # that would start an int32 entry in a slice (the high half of a
            # state key NID, then the low half of an event NID): not searched.
            BASE + 7: ([(MEMBER, MEMBER << 32, key | (BASE + 402) << 32)], True, 1),
        }
        wanted = algebra.key_number((MEMBER, key))
        # Each big block's two pieces of one entry: the first covers the keys
        # below the wanted one, the second from it.
        piece_rows = [
            (block_nid, piece, first, last, 2 + piece * width, width, 1)
            for block_nid, width in ((BASE + 5, 12), (BASE + 6, 24))
            for piece, first, last in ((0, 0, wanted - 1), (1, wanted, algebra.MAX_KEY_NUMBER))
        ] + [(BASE + 7, 0, 0, algebra.MAX_KEY_NUMBER, 2, 24, 1)]

        def write_txn(txn: LoggingTransaction) -> None:
            for block_nid, (entries, wide, pieces) in blocks.items():
                txn.execute(
                    "INSERT INTO nidstate_blocks (block_nid, room_nid, content_hash, entry_count,"
                    " entries, first_key, last_key, pieces) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        block_nid, BASE, bytearray(block_nid.to_bytes(16, "little")),
                        len(entries), bytearray(stored(entries, wide)), 0,
                        algebra.MAX_KEY_NUMBER, pieces,
                    ),
                )
            for row in piece_rows:
                txn.execute(
                    "INSERT INTO nidstate_block_pieces (block_nid, piece, first_key, last_key,"
                    " byte_start, byte_length, entry_count, content_hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row, bytearray(16)),
                )
            # (BASE + 2: what a coincidence across entries would take for the event.)
            for nid in (event, BASE + 2, BASE + 400, BASE + 401, BASE + 402, MEMBER):
                txn.execute(
                    "INSERT INTO nidstate_events (event_nid, event_id, room_nid) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (nid, f"$event{nid}", BASE),
                )

        await db_pool.runInteraction("nidstate_test_blocks", write_txn)

        def read_txn(
            txn: LoggingTransaction, block_nids: list[int], big_blocks_seen: bool = True
        ) -> list[Any]:
            sql, args = narrow_statement(
                db_pool.engine,
                block_nids,
                [(wanted, wanted)],
                big_blocks_seen,
                key_patterns(db_pool.engine, [(MEMBER, key)]),
            )
            txn.execute(sql, args)
            return [(row[1], row[12]) for row in txn.fetchall() if row[0] == 1]

        found_it = [(event, f"$event{event}")]
        for block_nid, expected in (
            (BASE + 1, found_it),
            (BASE + 2, []),
            (BASE + 3, []),
            (BASE + 4, []),
            (BASE + 5, found_it),
            (BASE + 6, []),
            (BASE + 7, []),
        ):
            found = await db_pool.runInteraction("nidstate_test_read", read_txn, [block_nid])
            self.assertEqual(found, expected, block_nid)
        # One row for each block that has it, from its bytes or its piece's slice.
        found = await db_pool.runInteraction("nidstate_test_read", read_txn, list(blocks))
        self.assertEqual(found, found_it * 2)
        # A process that reads big blocks whole searches them whole.
        for block_nid, expected in ((BASE + 4, found_it), (BASE + 5, found_it), (BASE + 6, [])):
            found = await db_pool.runInteraction(
                "nidstate_test_read", read_txn, [block_nid], False
            )
            self.assertEqual(found, expected, block_nid)
        # Keys the stored int32s cannot hold are not looked for.
        self.assertEqual(key_patterns(db_pool.engine, [(MEMBER, 2**31)]), [])

    @in_logcontext
    async def test_a_cold_one_member_read_reads_no_strings(self) -> None:
        """The group's snapshot, then its blocks with the member's event ID:
        two statements, the answer Synapse's."""
        hs = await self.make_homeserver({"mode": "serve"})
        group, state_filter = await history_group(hs)
        expected = await synapse_answer(hs, group, state_filter)
        self.assertTrue(expected)
        self.module(hs).lookups.clear_caches(hs)
        with SqlStatements() as statements:
            answer = await hs.get_datastores().state._get_state_for_groups([group], state_filter)
        self.assertEqual(dict(answer[group]), expected)
        ours = [
            sql for sql in statements.sql if "nidstate_" in sql and not sql.startswith("PREPARE ")
        ]
        self.assertEqual(len(ours), 2, ours)
