"""The narrow read's blocks statement, in the shapes tried for schema 8, timed
on a migrated PostgreSQL database.

    python -m benchmarks.statement_shapes --dsn "host=127.0.0.1 user=postgres dbname=nidstate_hq" \\
        [--room '!room0:hq.example'] [--keys 20] [--repeat 100]

For the latest snapshot of the room with the most blocks and ``--keys`` keys
drawn from its big blocks (seeded), each shape's statement for a one-key read
runs ``--repeat`` times in a loop (PostgreSQL's buffers warm, as for the
runner's "cold" reads, whose caches are the processes'), and its p50 wall
time as the client sees it (planning, execution, sending, psycopg2) is
printed beside the bytes of entries it returns and ``EXPLAIN``'s planning
time. The shapes: ``whole`` (schema 7's, and what the module runs until it
meets a big block: every block's entries where its range meets the key),
``union`` (schema 8's first: blocks, then ``UNION
ALL`` their pieces joined to them), ``lateral`` (what the module runs: the
pieces as a ``LATERAL`` subquery per big block that meets the key). On a
database without big blocks (M), the keys are the snapshot's blocks' first
keys, and the figures what the pieces' join costs where there is none.
"""

import argparse
import random
import statistics
import sys
import time

import psycopg2

from synapse_nidstate import algebra


def _meets(table: str, key: int) -> str:
    return f"({table}.first_key <= {key} AND {table}.last_key >= {key})"


def shapes(blocks: list[int], key: int) -> dict[str, str]:
    ids = "'{" + ",".join(map(str, blocks)) + "}'::bigint[]"
    b, p = _meets("b", key), _meets("p", key)
    return {
        "whole": (
            "SELECT b.block_nid, b.first_key, b.last_key, b.pieces, b.content_hash,"
            f" CASE WHEN b.first_key IS NULL OR {b} THEN b.entries END"
            f" FROM nidstate_blocks AS b WHERE b.block_nid = ANY({ids})"
        ),
        "union": (
            "SELECT b.block_nid, NULL, b.first_key, b.last_key, CASE WHEN COALESCE(b.pieces, 0) = 0"
            f" AND (b.first_key IS NULL OR {b}) THEN b.entries END, b.content_hash, b.pieces"
            f" FROM nidstate_blocks AS b WHERE b.block_nid = ANY({ids})"
            " UNION ALL SELECT p.block_nid, p.piece, p.first_key, p.last_key,"
            f" CASE WHEN {p} THEN substr(b.entries, p.byte_start, p.byte_length) END,"
            " p.content_hash, p.entry_count FROM nidstate_blocks AS b"
            " JOIN nidstate_block_pieces AS p ON p.block_nid = b.block_nid"
            f" WHERE b.block_nid = ANY({ids}) AND b.pieces > 0 AND ({b})"
        ),
        "lateral": (
            "SELECT b.block_nid, b.first_key, b.last_key, b.pieces, b.content_hash,"
            " CASE WHEN p.piece IS NULL THEN CASE WHEN COALESCE(b.pieces, 0) = 0"
            f" AND (b.first_key IS NULL OR {b}) THEN b.entries END"
            f" WHEN {p} THEN substr(b.entries, p.byte_start, p.byte_length) END,"
            " p.piece, p.first_key, p.last_key, p.content_hash, p.entry_count"
            " FROM nidstate_blocks AS b LEFT JOIN LATERAL (SELECT * FROM nidstate_block_pieces AS p"
            f" WHERE p.block_nid = b.block_nid AND b.pieces > 0 AND ({b}) OFFSET 0) AS p ON TRUE"
            f" WHERE b.block_nid = ANY({ids})"
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="libpq DSN of the migrated database")
    parser.add_argument("--room", help="room ID (default: the room whose snapshots list most blocks)")
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    try:
        conn = psycopg2.connect(args.dsn)
    except psycopg2.Error as e:
        print(f"cannot connect: {e}", file=sys.stderr)
        return 2
    cur = conn.cursor()
    room_clause = "WHERE r.room_id = %s" if args.room else ""
    cur.execute(
        "SELECT s.block_nids FROM nidstate_snapshots AS s JOIN nidstate_rooms AS r"
        f" ON r.room_nid = s.room_nid {room_clause}"
        " ORDER BY length(s.block_nids) DESC, s.snapshot_nid DESC LIMIT 1",
        (args.room,) if args.room else (),
    )
    row = cur.fetchone()
    if row is None:
        print("no snapshot: is the database migrated?", file=sys.stderr)
        return 2
    blocks = list(algebra.unpack_nids(bytes(row[0])))
    cur.execute(
        "SELECT p.first_key, b.entry_count FROM nidstate_block_pieces AS p"
        " JOIN nidstate_blocks AS b ON b.block_nid = p.block_nid WHERE p.block_nid = ANY(%s)",
        (blocks,),
    )
    candidates = cur.fetchall()
    if not candidates:
        # No big block (M and smaller): the keys are the blocks' first keys,
        # and what is timed is the cost of the pieces' join where none is.
        cur.execute(
            "SELECT first_key, entry_count FROM nidstate_blocks"
            " WHERE block_nid = ANY(%s) AND first_key IS NOT NULL",
            (blocks,),
        )
        candidates = cur.fetchall()
        print("no block of this snapshot has pieces: keys are its blocks' first keys")
    keys = random.Random(args.seed).sample(candidates, min(args.keys, len(candidates)))
    print(
        f"{len(blocks)} blocks in the snapshot; {len(keys)} keys, each a piece's (or a block's) first, of"
        f" blocks of {min(c for _, c in keys)} to {max(c for _, c in keys)} entries;"
        f" {args.repeat} runs of each statement a key"
    )
    times: dict[str, list[float]] = {}
    planning: dict[str, list[float]] = {}
    sent: dict[str, list[int]] = {}
    for key, _ in keys:
        for name, sql in shapes(blocks, key).items():
            cur.execute("EXPLAIN (ANALYZE, SUMMARY) " + sql)
            plan = [r[0] for r in cur.fetchall()]
            planning.setdefault(name, []).append(
                float(next(line for line in plan if line.startswith("Planning Time")).split()[2])
            )
            runs = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                cur.execute(sql)
                rows = cur.fetchall()
                runs.append(time.perf_counter() - started)
            times.setdefault(name, []).append(statistics.median(runs) * 1000)
            column = 4 if name == "union" else 5
            sent.setdefault(name, []).append(sum(len(r[column] or b"") for r in rows))
    print("| shape | p50 ms (median over keys) | planning ms | entries' bytes sent |")
    print("|---|---|---|---|")
    for name in times:
        print(
            f"| {name} | {statistics.median(times[name]):.3f} | {statistics.median(planning[name]):.3f}"
            f" | {statistics.median(sent[name]):,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
