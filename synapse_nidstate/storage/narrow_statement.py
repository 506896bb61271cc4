"""The statement of a narrow read's blocks (``BlockStore._narrow_rows_txn``),
and the event IDs it can bring along.

One row per block: its stored key range, its content hash and, if its range
meets a wanted key, its entries; per piece of a big block (schema 8) whose
cover meets one, the piece's slice of the block's bytes.

**Event IDs beside the blocks** (PostgreSQL, a filter of exact keys: one
member, the visibility of a page of events). The last statement of a cold
narrow read was the event IDs of the NIDs it kept, which a read only knows
once it has resolved its blocks in Python. But the entries of a block are
stored sorted, three little-endian int32s each after a tag byte
(``algebra.encoding``), so the server can find a wanted key's entry in a
block without decoding it: ``position()`` of the key's eight bytes in the
block's bytes, at an offset that starts an entry (one that does not is a
coincidence across entries, and gives nothing). The event NID after it is
joined to ``nidstate_events`` in the same statement. What this gives is only
a map of event NIDs to IDs, from the same table the last statement reads:
which entry wins is still decided in Python, from the blocks checked against
their hashes, and an event NID the map lacks (after a coincidence, or in a
big block a process still reads whole) is read by the last statement as
before. A big block read by pieces is searched in the slices of the pieces
that cover a wanted key, as the blocks' rows read them.
"""

import functools
import struct
from collections.abc import Sequence
from typing import Any

from synapse.storage.engines import BaseDatabaseEngine, PostgresEngine

from synapse_nidstate.algebra.encoding import INT32_TAG
from synapse_nidstate.storage.common import in_list_clause

#: Width of a stored int32 entry (type, state key, event NID), and the offset
#: (1-based, as ``position()`` counts) of the first entry's first byte.
_ENTRY_BYTES = 12
_FIRST_ENTRY_AT = 2

#: At most this many keys are looked for beside the blocks (a page's
#: visibility asks two; more is a lazy-loading filter, which reads strings
#: anyway for the other state it keeps).
MOST_KEYS = 8

_INT32_MAX = 2**31 - 1


def key_patterns(
    engine: BaseDatabaseEngine, keys: Sequence[tuple[int, int]] | None
) -> list[bytearray]:
    """The stored bytes of each of ``keys`` (type NID, state key NID), for
    finding their entries in a block's bytes; none where the engine, the
    keys' number or their NIDs do not allow it."""
    if not keys or len(keys) > MOST_KEYS or not isinstance(engine, PostgresEngine):
        return []
    if any(not 0 <= n <= _INT32_MAX for key in keys for n in key):
        return []
    # (bytearray: Synapse's PostgresEngine refuses to pass bytes.)
    return [bytearray(struct.pack("<ii", type_nid, key_nid)) for type_nid, key_nid in keys]


def _int32_at(column: str, offset: str) -> str:
    """The little-endian int32 at 0-based ``offset`` of the bytea ``column``."""
    return (
        f"(get_byte({column}, {offset}) | (get_byte({column}, {offset} + 1) << 8)"
        f" | (get_byte({column}, {offset} + 2) << 16)"
        f" | (get_byte({column}, {offset} + 3)::bigint << 24))"
    )


def _meets(table: str, ranges: int) -> str:
    """Whether ``table``'s stored key range meets one of ``ranges`` key
    ranges (their arguments: :func:`_range_args`)."""
    return " OR ".join([f"({table}.first_key <= ? AND {table}.last_key >= ?)"] * ranges)


def _range_args(key_ranges: Sequence[tuple[int, int]]) -> list[int]:
    return [v for lo, hi in key_ranges for v in (hi, lo)]


def narrow_statement(
    engine: BaseDatabaseEngine,
    missing: Sequence[int],
    key_ranges: Sequence[tuple[int, int]],
    big_blocks_seen: bool,
    patterns: Sequence[bytearray] = (),
) -> tuple[str, list[Any]]:
    """The statement and its arguments. Its rows: ``(0, block NID, first
    key, last key, pieces, content hash (where the entries come), entries
    or a piece's slice, piece, piece's first key, its last key, its content
    hash, its entry count, NULL)`` for the blocks, then ``(1, event NID,
    NULL, ..., event ID)`` for the entries of ``patterns`` found in them
    (see above).

    Until the process has met a big block (``big_blocks_seen``), there is
    no join to the pieces, and a big block that meets the ranges is given
    whole (checked as any block).

    The text depends only on the statement's shape (the IN-list clause, the
    number of ranges, the pieces' join, whether patterns are looked for), so
    it is built once a shape: the same string each time, whose hash the
    prepared statements' lookup then does not compute again."""
    clause, in_args = in_list_clause(engine, "b.block_nid", missing)
    range_args = _range_args(key_ranges)
    sql = _narrow_sql(
        isinstance(engine, PostgresEngine), clause, len(key_ranges), big_blocks_seen, bool(patterns)
    )
    # Four range tests with the pieces' join, two without; each with the same arguments.
    args: list[Any] = range_args * (4 if big_blocks_seen else 2) + in_args
    if patterns:
        args.append(list(patterns))  # the search among the rows (_event_ids_beside)
    return sql, args


@functools.lru_cache(maxsize=256)
def _narrow_sql(
    postgres: bool, clause: str, ranges: int, big_blocks_seen: bool, with_patterns: bool
) -> str:
    """:func:`narrow_statement`'s text for one shape (``clause``: the blocks'
    IN-list clause, on ``b.block_nid``)."""
    meets_b, meets_p = _meets("b", ranges), _meets("p", ranges)
    if big_blocks_seen:
        # A row per block, and per piece of a big block holding a wanted
        # key. PostgreSQL: the pieces as a LATERAL subquery, fenced by
        # OFFSET 0, so that it runs per big block that meets (a probe of
        # the pieces' key) rather than being flattened into a join that
        # reads them all; one scan of the blocks, where a UNION ALL of
        # blocks and pieces planned two (0.2 ms more planning at HQ
        # scale). SQLite, which has no LATERAL, loops over the blocks and
        # probes the pieces the same way.
        join = (
            "LEFT JOIN LATERAL (SELECT * FROM nidstate_block_pieces AS p"
            f" WHERE p.block_nid = b.block_nid AND b.pieces > 0 AND ({meets_b}) OFFSET 0)"
            " AS p ON TRUE"
            if postgres
            else "LEFT JOIN nidstate_block_pieces AS p ON p.block_nid = b.block_nid"
            f" AND b.pieces > 0 AND ({meets_b})"
        )
        whole = (
            "p.piece IS NULL AND COALESCE(b.pieces, 0) = 0"
            f" AND (b.first_key IS NULL OR {meets_b})"
        )
        # (A row without a piece has NULL piece columns: its range test is not true.)
        entries = (
            f"CASE WHEN {whole} THEN b.entries"
            f" WHEN {meets_p} THEN substr(b.entries, p.byte_start, p.byte_length) END,"
            " p.piece, p.first_key, p.last_key, p.content_hash, p.entry_count"
        )
    else:
        join = ""
        whole = f"b.first_key IS NULL OR {meets_b}"
        # (Typed: the event IDs' search of PostgreSQL computes with them.)
        entries = (
            f"CASE WHEN {whole} THEN b.entries END, CAST(NULL AS INTEGER), CAST(NULL AS BIGINT),"
            " CAST(NULL AS BIGINT), CAST(NULL AS BYTEA), CAST(NULL AS INTEGER)"
        )
    # A block's content hash only where its entries come: the others' would
    # only be decoded by the driver, a bytea a row of dozens.
    columns = (
        "0, b.block_nid, b.first_key, b.last_key, b.pieces,"
        f" CASE WHEN {whole} THEN b.content_hash END, {entries}"
    )
    source = f"FROM nidstate_blocks AS b {join} WHERE {clause}"
    if not with_patterns:
        return f"SELECT {columns}, NULL {source}"
    # The blocks' rows once (materialized: the search reads the bytes they
    # give), then the event IDs found in them.
    return (
        "WITH r(kind, nid, first_key, last_key, pieces, digest, data, piece, piece_first,"
        f" piece_last, piece_digest, piece_entries) AS MATERIALIZED (SELECT {columns} {source})"
        f" SELECT *, NULL FROM r UNION ALL {_event_ids_beside()}"
    )


def _event_ids_beside() -> str:
    """The branch that finds the wanted keys' entries in the bytes the
    blocks' rows (``r``) give, and their event IDs; its argument: the
    patterns.

    A row's bytes are a block's, whole (a tag byte, then its entries), or a
    slice of a big block's, for a piece whose cover meets the ranges (whole
    entries: pieces are cut at entries, ``algebra.pieces``), which are the
    rows whose ``piece`` is set. An entry of int32s starts at an offset of 2
    mod 12 in a block's bytes (1-based, as ``position()`` counts) and of 1
    mod 12 in a slice; a block is of int32s if its tag says so, a slice if
    its length is 12 bytes an entry. In a big room most members' entries are
    in a compaction's big chunk: the slices are searched where the statement
    has already cut them (a second ``substr`` of a compressed block would
    decompress it again)."""
    event_nid = _int32_at("r.data", "f.at + 7")  # 0-based: the entry's third int32
    return (
        "SELECT 1, e.event_nid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
        " e.event_id FROM r CROSS JOIN unnest(?::bytea[]) AS k(pattern)"
        " CROSS JOIN LATERAL (SELECT position(k.pattern IN r.data) AS at) AS f"
        f" JOIN nidstate_events AS e ON e.event_nid = {event_nid}"
        " WHERE r.data IS NOT NULL AND f.at > 0 AND CASE WHEN r.piece IS NULL"
        f" THEN get_byte(r.data, 0) = {INT32_TAG}"
        f" AND mod(f.at - {_FIRST_ENTRY_AT}, {_ENTRY_BYTES}) = 0"
        f" ELSE length(r.data) = {_ENTRY_BYTES} * r.piece_entries"
        f" AND mod(f.at - 1, {_ENTRY_BYTES}) = 0 END"
    )
