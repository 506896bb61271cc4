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
            # Stored as int64s, or read by pieces (big): left to the strings' statement.
            BASE + 3: ([(MEMBER, key, event)], True, 0),
            BASE + 4: ([(MEMBER, key, event)], False, 2),
        }
        wanted = algebra.key_number((MEMBER, key))

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
            # (BASE + 2: what a coincidence across entries would take for the event.)
            for nid in (event, BASE + 2, BASE + 400, BASE + 401, MEMBER):
                txn.execute(
                    "INSERT INTO nidstate_events (event_nid, event_id, room_nid) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (nid, f"$event{nid}", BASE),
                )

        await db_pool.runInteraction("nidstate_test_blocks", write_txn)

        def read_txn(txn: LoggingTransaction, block_nids: list[int]) -> list[Any]:
            sql, args = narrow_statement(
                db_pool.engine,
                block_nids,
                [(wanted, wanted)],
                True,
                key_patterns(db_pool.engine, [(MEMBER, key)]),
            )
            txn.execute(sql, args)
            return [(row[1], row[12]) for row in txn.fetchall() if row[0] == 1]

        for block_nid, expected in (
            (BASE + 1, [(event, f"$event{event}")]),
            (BASE + 2, []),
            (BASE + 3, []),
            (BASE + 4, []),
        ):
            found = await db_pool.runInteraction("nidstate_test_read", read_txn, [block_nid])
            self.assertEqual(found, expected, block_nid)
        found = await db_pool.runInteraction("nidstate_test_read", read_txn, list(blocks))
        self.assertEqual(found, [(event, f"$event{event}")])
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
