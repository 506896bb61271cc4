"""`python -m benchmarks.strings`: what turning a whole state's NIDs into
strings costs on PostgreSQL, against Synapse's read of the same state.

The bound of a cold whole-state read (docs/benchmarks.md): Synapse reads a
full copy of a state as rows of three strings from one indexed range of
``state_groups_state``; the module has the state in NIDs and reads the
strings by NID. On a migrated database this takes Synapse's biggest full
copy, its entries in NIDs, and times, in one process and one connection
(p50 of ``--rounds``, each way answering the same dict):

* ``native``: Synapse's read of the group's rows;
* ``by NID``: the module's statement (``ResolvedStateStore._strings_of_nids_read``):
  types, state keys and event IDs by ``= ANY`` of their NIDs, then the dict;
* ``one row per entry``: the three strings joined to each entry's NIDs
  (``unnest ... JOIN``), so the client builds one row per entry;
* ``events by room``: the event IDs of the room's interned events by
  ``room_nid`` (a range of the index) instead of by NID;
* ``packed by room``: a layout the module does not have, measured to decide
  whether to build it: each room's state events in chunks of ``--chunk``
  rows, a row holding the chunk's event NIDs and, packed in one text value,
  each event's state key and event ID (built here in a temporary table from
  Synapse's ``state_events``). The whole state's strings are then a few rows
  read by one range of an index and split in Python, the types by NID.

    python -m benchmarks.strings --dsn "host=127.0.0.1 user=postgres dbname=nidstate_bench_m"
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg2

Triples = list[tuple[int, int, int]]
State = dict[tuple[str, str], str]


def _array(values: Any) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _by_kind(rows: list[tuple[int, int, str]]) -> list[dict[int, str]]:
    found: list[dict[int, str]] = [{}, {}, {}]
    for kind, nid, string in rows:
        found[kind][nid] = string
    return found


#: Separators of the packed layout (not in event IDs or the state keys here;
#: a real layout would length-prefix).
UNIT, RECORD = "\x1f", "\x1e"


def build_packed(cur: Any, room_nid: int, chunk: int) -> tuple[int, int]:
    """The temporary table of ``packed by room`` for the room: (rows, bytes)."""
    cur.execute(
        "CREATE TEMPORARY TABLE packed_strings AS"
        " SELECT room_nid, n / %s AS chunk, array_agg(event_nid ORDER BY event_nid) AS event_nids,"
        "  string_agg(state_key || %s || event_id, %s ORDER BY event_nid) AS packed"
        " FROM (SELECT e.room_nid, e.event_nid, e.event_id, s.state_key,"
        "   row_number() OVER (ORDER BY e.event_nid) - 1 AS n"
        "  FROM nidstate_events AS e JOIN state_events AS s USING (event_id)"
        "  WHERE e.room_nid = %s) AS numbered"
        " GROUP BY room_nid, n / %s",
        (chunk, UNIT, RECORD, room_nid, chunk),
    )
    cur.execute("CREATE INDEX ON packed_strings (room_nid, chunk)")
    cur.execute("ANALYZE packed_strings")
    cur.execute(
        "SELECT COUNT(*), COALESCE(SUM(pg_column_size(event_nids) + pg_column_size(packed)), 0)"
        " FROM packed_strings"
    )
    rows, size = cur.fetchone()
    return int(rows), int(size)


def ways(cur: Any, group: int, room_nid: int, triples: Triples) -> dict[str, Callable[[], State]]:
    types = _array({t for t, _, _ in triples})
    keys = _array({k for _, k, _ in triples})
    events = _array({e for _, _, e in triples})

    def native() -> State:
        cur.execute(
            "SELECT type, state_key, event_id FROM state_groups_state WHERE state_group = %s",
            (group,),
        )
        return {(t, k): e for t, k, e in cur.fetchall()}

    def by_nid() -> State:
        cur.execute(
            "SELECT 0, type_nid, event_type FROM nidstate_event_types"
            " WHERE type_nid = ANY(%s::bigint[])"
            " UNION ALL SELECT 1, state_key_nid, state_key FROM nidstate_state_keys"
            " WHERE state_key_nid = ANY(%s::bigint[])"
            " UNION ALL SELECT 2, event_nid, event_id FROM nidstate_events"
            " WHERE event_nid = ANY(%s::bigint[])",
            (types, keys, events),
        )
        t, k, e = _by_kind(cur.fetchall())
        return {(t[a], k[b]): e[c] for a, b, c in triples}

    def one_row_per_entry() -> State:
        cur.execute(
            "SELECT ty.event_type, k.state_key, e.event_id"
            " FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS u(t, k, e)"
            " JOIN nidstate_event_types AS ty ON ty.type_nid = u.t"
            " JOIN nidstate_state_keys AS k ON k.state_key_nid = u.k"
            " JOIN nidstate_events AS e ON e.event_nid = u.e",
            tuple(_array(column) for column in zip(*triples)),
        )
        return {(t, k): e for t, k, e in cur.fetchall()}

    def events_by_room() -> State:
        cur.execute(
            "SELECT 0, type_nid, event_type FROM nidstate_event_types"
            " WHERE type_nid = ANY(%s::bigint[])"
            " UNION ALL SELECT 1, state_key_nid, state_key FROM nidstate_state_keys"
            " WHERE state_key_nid = ANY(%s::bigint[])"
            " UNION ALL SELECT 2, event_nid, event_id FROM nidstate_events WHERE room_nid = %s",
            (types, keys, room_nid),
        )
        t, k, e = _by_kind(cur.fetchall())
        return {(t[a], k[b]): e[c] for a, b, c in triples}

    def packed_by_room() -> State:
        cur.execute(
            "SELECT NULL::bigint[], event_type, type_nid FROM nidstate_event_types"
            " WHERE type_nid = ANY(%s::bigint[])"
            " UNION ALL SELECT event_nids, packed, NULL FROM packed_strings WHERE room_nid = %s",
            (types, room_nid),
        )
        type_of: dict[int, str] = {}
        key_of: dict[int, str] = {}
        id_of: dict[int, str] = {}
        for nids, text, type_nid in cur.fetchall():
            if nids is None:
                type_of[type_nid] = text
                continue
            for nid, record in zip(nids, text.split(RECORD)):
                key_of[nid], id_of[nid] = record.split(UNIT)
        return {(type_of[a], key_of[c]): id_of[c] for a, _, c in triples}

    return {
        "native": native,
        "by NID": by_nid,
        "one row per entry": one_row_per_entry,
        "events by room": events_by_room,
        "packed by room": packed_by_room,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.strings")
    parser.add_argument("--dsn", required=True, help="libpq DSN of a migrated PostgreSQL database")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=256, help="events a row in `packed by room`")
    args = parser.parse_args()
    try:
        connection = psycopg2.connect(args.dsn)
    except psycopg2.Error as e:
        print(f"cannot connect: {e}".strip(), file=sys.stderr)
        return 2
    cur = connection.cursor()
    # Synapse's biggest full copy (a group without an edge) that the module mirrored.
    cur.execute(
        "SELECT s.state_group, COUNT(*) FROM state_groups_state AS s"
        " WHERE NOT EXISTS (SELECT 1 FROM state_group_edges AS e"
        "   WHERE e.state_group = s.state_group)"
        " AND EXISTS (SELECT 1 FROM nidstate_state_groups AS g WHERE g.state_group = s.state_group)"
        " GROUP BY s.state_group ORDER BY COUNT(*) DESC LIMIT 1"
    )
    row = cur.fetchone()
    if row is None:
        print("no mirrored full copy: migrate the database first", file=sys.stderr)
        return 2
    group, entries = row
    cur.execute(
        "SELECT t.type_nid, k.state_key_nid, e.event_nid, e.room_nid FROM state_groups_state AS s"
        " JOIN nidstate_event_types AS t ON t.event_type = s.type"
        " JOIN nidstate_state_keys AS k ON k.state_key = s.state_key"
        " JOIN nidstate_events AS e ON e.event_id = s.event_id WHERE s.state_group = %s",
        (group,),
    )
    rows = cur.fetchall()
    triples = [(t, k, e) for t, k, e, _ in rows]
    room_nid = rows[0][3]
    cur.execute("SELECT COUNT(*) FROM nidstate_events WHERE room_nid = %s", (room_nid,))
    (room_events,) = cur.fetchone()
    packed_rows, packed_bytes = build_packed(cur, room_nid, args.chunk)
    candidates = ways(cur, group, room_nid, triples)
    answers = {name: way() for name, way in candidates.items()}
    if any(answer != answers["native"] for answer in answers.values()):
        print("the ways answer differently", file=sys.stderr)
        return 1
    print(
        f"state group {group}: {entries:,} entries; its room has {room_events:,} interned "
        f"events; p50 of {args.rounds} rounds, the ways interleaved"
    )
    print(
        f"packed by room: {packed_rows:,} rows of up to {args.chunk} state events, "
        f"{packed_bytes:,} bytes of values"
    )
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, way in candidates.items():
            started = time.perf_counter()
            way()
            samples[name].append(time.perf_counter() - started)
    native = statistics.median(samples["native"])
    for name, taken in samples.items():
        p50 = statistics.median(taken)
        print(f"{name:>18}: {p50 * 1000:6.2f} ms  ({p50 / native:.1f}x native's time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
