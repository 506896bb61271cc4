"""The first statement of a read of the state at events (each event's
snapshot and its block list), in the shapes tried, timed on a migrated
PostgreSQL database.

    python -m benchmarks.event_snapshot_shapes --dsn "host=127.0.0.1 user=postgres dbname=nidstate_bench_m" \\
        [--room '!room:example'] [--batch 100] [--batches 20] [--repeat 20]

Of the room with the most members (or ``--room``), its latest events that
have a state group, cut into ``--batches`` batches of ``--batch`` (what a
``/messages`` page asks for): each shape's statement for each batch runs
``--repeat`` times, alternating shapes (PostgreSQL's buffers warm, as for
the runner's "cold" reads, whose caches are the processes'). Printed for
each: the p50 wall time as the client sees it (planning, execution,
sending, psycopg2; the median over batches of each batch's median), and
``EXPLAIN ANALYZE``'s planning and execution times and the plan's first
scan of ``event_to_state_groups``. The shapes:

- ``any_array``: ``esg.event_id = ANY(?)`` with the IDs as psycopg2 sends a
  Python list (``ARRAY['$a', ...]``, Synapse's ``make_in_list_sql_clause``);
- ``any_literal``: what the module runs: the same with one ``text[]``
  literal (``storage.common.in_list_clause``);
- ``lateral``: tried and not kept: the IDs unnested, each a probe of
  ``event_to_state_groups``'s ``event_id`` index fenced by ``OFFSET 0``. At M
  (9,673 rows) PostgreSQL plans the other two as a scan of the whole table
  and a hash of every group, and this shape took half their time; at L
  (31,621 rows) it plans them as a bitmap scan of the index, and this shape
  took a tenth more (docs/benchmarks.md, "PostgreSQL L, session 22").

The snapshot's own columns come the same way in all three; the filter's
strings, which the module adds as ``UNION ALL`` branches, are left out.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from synapse_nidstate.storage.common import text_array_literal

_COLUMNS = "SELECT 0, {key}, NULL, g.snapshot_nid, s.block_nids, s.content_hash"
_SNAPSHOTS = " LEFT JOIN nidstate_snapshots AS s ON s.snapshot_nid = g.snapshot_nid"
_GROUPS = " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"

#: name -> (SQL with one %s, the batch as its argument)
SHAPES: dict[str, tuple[str, Callable[[list[str]], Any]]] = {
    "any_array": (
        _COLUMNS.format(key="esg.event_id") + " FROM event_to_state_groups AS esg" + _GROUPS
        + _SNAPSHOTS + " WHERE esg.event_id = ANY(%s)",
        list,
    ),
    "any_literal": (
        _COLUMNS.format(key="esg.event_id") + " FROM event_to_state_groups AS esg" + _GROUPS
        + _SNAPSHOTS + " WHERE esg.event_id = ANY(%s::text[])",
        text_array_literal,
    ),
    "lateral": (
        _COLUMNS.format(key="q.event_id") + " FROM unnest(%s::text[]) AS q(event_id) CROSS JOIN LATERAL"
        " (SELECT esg.state_group FROM event_to_state_groups AS esg"
        " WHERE esg.event_id = q.event_id OFFSET 0) AS esg" + _GROUPS + _SNAPSHOTS,
        text_array_literal,
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="libpq DSN of the migrated database")
    parser.add_argument("--room", help="room ID (default: the room with the most members)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    try:
        conn = psycopg2.connect(args.dsn)
    except psycopg2.Error as e:
        print(f"cannot connect: {e}", file=sys.stderr)
        return 2
    cur = conn.cursor()
    room = args.room
    if room is None:
        cur.execute(
            "SELECT room_id FROM current_state_events WHERE type = 'm.room.member'"
            " GROUP BY room_id ORDER BY count(*) DESC LIMIT 1"
        )
        row = cur.fetchone()
        if row is None:
            print("no room with members: is this a Synapse database?", file=sys.stderr)
            return 2
        room = row[0]
    cur.execute(
        "SELECT e.event_id FROM events AS e JOIN event_to_state_groups AS esg"
        " ON esg.event_id = e.event_id WHERE e.room_id = %s"
        " ORDER BY e.stream_ordering DESC LIMIT %s",
        (room, args.batch * args.batches),
    )
    ids = [r[0] for r in cur.fetchall()]
    batches = [ids[i : i + args.batch] for i in range(0, len(ids), args.batch)]
    batches = [b for b in batches if len(b) == args.batch]
    if not batches:
        print(f"fewer than {args.batch} events with a state group in {room}", file=sys.stderr)
        return 2
    cur.execute("SELECT count(*) FROM event_to_state_groups")
    (rows_total,) = cur.fetchone()
    cur.execute("SELECT count(*) FROM nidstate_state_groups")
    (groups_total,) = cur.fetchone()
    conn.commit()
    print(
        f"{room}: {len(batches)} batches of {args.batch} events, {args.repeat} runs of each"
        f" shape a batch; event_to_state_groups {rows_total:,} rows,"
        f" nidstate_state_groups {groups_total:,}"
    )
    times: dict[str, list[float]] = {name: [] for name in SHAPES}
    planning: dict[str, list[float]] = {name: [] for name in SHAPES}
    execution: dict[str, list[float]] = {name: [] for name in SHAPES}
    scans: dict[str, str] = {}
    for batch in batches:
        runs: dict[str, list[float]] = {name: [] for name in SHAPES}
        for _ in range(args.repeat):
            for name, (sql, argument) in SHAPES.items():
                value = argument(batch)
                started = time.perf_counter()
                cur.execute(sql, (value,))
                rows = cur.fetchall()
                runs[name].append(time.perf_counter() - started)
                conn.commit()
                if len(rows) != len(batch):
                    print(f"{name}: {len(rows)} rows for {len(batch)} events", file=sys.stderr)
                    return 1
        for name, (sql, argument) in SHAPES.items():
            times[name].append(statistics.median(runs[name]) * 1000)
            cur.execute("EXPLAIN (ANALYZE, SUMMARY) " + sql, (argument(batch),))
            plan = [r[0] for r in cur.fetchall()]
            conn.commit()
            for line in plan:
                if line.startswith("Planning Time"):
                    planning[name].append(float(line.split()[2]))
                elif line.startswith("Execution Time"):
                    execution[name].append(float(line.split()[2]))
                elif "on event_to_state_groups" in line and name not in scans:
                    scans[name] = line.strip().split("  (")[0].lstrip("-> ")
    print("| shape | p50 ms | planning ms | execution ms | event_to_state_groups read by |")
    print("|---|---|---|---|---|")
    for name in SHAPES:
        print(
            f"| {name} | {statistics.median(times[name]):.3f} | {statistics.median(planning[name]):.3f}"
            f" | {statistics.median(execution[name]):.3f} | {scans.get(name, '?')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
