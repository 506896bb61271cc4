"""`synapse-nidstate stats`: the storage report against the database's own size functions."""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import sqlite3
from collections import defaultdict
from typing import Any
from unittest import mock

import attr
from synapse.api.constants import EventTypes
from synapse.server import HomeServer
from synapse.storage.database import DatabasePool
from synapse.util.duration import Duration

from synapse_nidstate.commands import stats as stats_command
from synapse_nidstate.commands.plot import draw_report, plot_report, plot_target_problem
from synapse_nidstate.commands.stats import add_arguments, format_report, report_as_json, run
from synapse_nidstate.commands.storage_figures import (
    NIDSTATE,
    SYNAPSE,
    SYNAPSE_MAIN_TABLES,
    SYNAPSE_STATE_TABLES,
    StorageReport,
    TableStats,
    format_bytes,
    storage_report,
)
from synapse_nidstate.demo.history import Driver, HistoryShape, realistic_history
from synapse_nidstate.storage.schema import TABLES
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    HomeserverTestCase,
    in_logcontext,
    temporary_directory,
)
from tests.scenarios import build_history

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: JSON keys that may be null without being figures.
_TEXT_KEYS = {"name", "canonical_alias"}


def _round_binary(step: float) -> bool:
    """1, 2 or 5 times a power of ten, times a power of 1024 (200 KiB, 0.5 MiB)."""
    mantissas = [(step / 1024**k) / 10 ** math.floor(math.log10(step / 1024**k)) for k in range(5)]
    return any(math.isclose(x, m) for x in mantissas for m in (1, 2, 5, 10))


async def _names(hs: HomeServer, rooms: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """Each room's name and canonical alias, from its current state."""
    controller = hs.get_storage_controllers().state
    found = {}
    for room in rooms:
        name = await controller.get_current_state_event(room, EventTypes.Name, "")
        alias = await controller.get_current_state_event(room, EventTypes.CanonicalAlias, "")
        found[room] = (name and name.content.get("name"), alias and alias.content.get("alias"))
    return found


def _matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def _db_args(db_pool: DatabasePool) -> dict[str, Any]:
    return db_pool._database_config.config["args"]


class _Independent:
    """The database's own figures, read on a connection of the test's own."""

    def __init__(self, db_pool: DatabasePool, engine: str) -> None:
        self.engine = engine
        args = _db_args(db_pool)
        if engine == "postgres":
            import psycopg2

            self.conn: Any = psycopg2.connect(
                host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=args["database"]
            )
            self.conn.autocommit = True
        else:
            self.conn = sqlite3.connect(args["database"])

    def close(self) -> None:
        self.conn.close()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.engine == "postgres":
            with self.conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []
        return self.conn.execute(sql, params).fetchall()

    def count(self, table: str) -> int:
        return self.query(f"SELECT COUNT(*) FROM {table}")[0][0]

    def freeze(self, tables: tuple[str, ...]) -> None:
        """No autovacuum from now on: it would add free-space and visibility maps
        between the report's measurement and ours."""
        if self.engine == "postgres":
            for table in tables:
                self.query(
                    f"ALTER TABLE {table} SET "
                    "(autovacuum_enabled = false, toast.autovacuum_enabled = false)"
                )

    def dbstat(self) -> dict[str, int]:
        """SQLite: bytes of each table with its indexes, from the whole-file dbstat scan."""
        owner = dict(self.query("SELECT name, tbl_name FROM sqlite_master"))
        sizes: dict[str, int] = defaultdict(int)
        for name, size in self.query("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            sizes[f"{owner.get(name, name)}:{'table' if owner.get(name) == name else 'index'}"] += size
        return sizes


class StatsTests:
    """Shared by the SQLite and PostgreSQL classes below."""

    engine: str

    def _check_tables(self, tables: list[TableStats], db: _Independent, names: tuple[str, ...]) -> None:
        self.assertEqual([t.name for t in tables], list(names))
        eq = self.assertEqual
        sqlite_sizes = db.dbstat() if self.engine == "sqlite" else {}
        for t in tables:
            self.assertTrue(t.exists, t.name)
            eq(t.rows, db.count(t.name), t.name)
            assert t.table_bytes is not None and t.index_bytes is not None
            assert t.total_bytes is not None
            if self.engine == "postgres":
                assert t.toast_bytes is not None
                (relation, table_size, indexes, total, toast), = db.query(
                    "SELECT pg_relation_size(?::regclass), pg_table_size(?::regclass),"
                    " pg_indexes_size(?::regclass), pg_total_relation_size(?::regclass),"
                    " (SELECT CASE WHEN reltoastrelid = 0 THEN 0"
                    "  ELSE pg_total_relation_size(reltoastrelid) END"
                    "  FROM pg_class WHERE oid = ?::regclass)",
                    (t.name,) * 5,
                )
                eq(t.total_bytes, total, t.name)
                eq(t.index_bytes, indexes, t.name)
                eq(t.toast_bytes, toast, t.name)
                eq(t.table_bytes + t.toast_bytes, table_size, t.name)  # psql \dt+
                eq(t.table_bytes + t.index_bytes + t.toast_bytes, t.total_bytes, t.name)
                self.assertGreaterEqual(t.table_bytes, relation)
                # Every table of both sides has a primary key or unique index.
                self.assertGreater(t.index_bytes, 0, t.name)
            else:
                self.assertIsNone(t.toast_bytes)
                eq(t.table_bytes, sqlite_sizes.get(f"{t.name}:table", 0), t.name)
                eq(t.index_bytes, sqlite_sizes.get(f"{t.name}:index", 0), t.name)
                eq(t.total_bytes, t.table_bytes + t.index_bytes, t.name)
                page_size = db.query("PRAGMA page_size")[0][0]
                self.assertEqual(t.table_bytes % page_size, 0)
                self.assertGreater(t.table_bytes, 0)
        if self.engine == "sqlite":
            page_size = db.query("PRAGMA page_size")[0][0]
            page_count = db.query("PRAGMA page_count")[0][0]
            self.assertLessEqual(sum(t.total_bytes or 0 for t in tables), page_size * page_count)

    def _synapse_rooms(self, db: _Independent) -> list[tuple[str, int, int]]:
        """(room, rows, data bytes) of state_groups_state, computed here in Python."""
        per_room: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for room_id, event_type, state_key, event_id in db.query(
            "SELECT room_id, type, state_key, event_id FROM state_groups_state"
        ):
            values = [v.encode() for v in (room_id, event_type, state_key, event_id)]
            # A short text is stored with a 1-byte header on PostgreSQL.
            header = 1 if self.engine == "postgres" else 0
            for v in values:
                assert len(v) < 127, "the test's strings are short"
            per_room[room_id][0] += 1
            per_room[room_id][1] += 8 + sum(len(v) + header for v in values)
        return sorted(((room, n, size) for room, (n, size) in per_room.items()), key=lambda r: (-r[1], r[0]))

    def _module_rooms(self, db: _Independent) -> dict[str, tuple[int, int, int]]:
        """Room -> (entries, blocks, data bytes) of nidstate_blocks, computed here."""
        per_room: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for room_id, entry_count, entries in db.query(
            "SELECT r.room_id, b.entry_count, b.entries FROM nidstate_blocks b"
            " JOIN nidstate_rooms r ON r.room_nid = b.room_nid"
        ):
            for i, n in enumerate((entry_count, 1, len(bytes(entries)))):
                per_room[room_id][i] += n
            # A tag byte, then int32 (or int64) triples.
            self.assertIn(len(bytes(entries)), (1 + 12 * entry_count, 1 + 24 * entry_count))
        return {room: (n, blocks, size) for room, (n, blocks, size) in per_room.items()}

    async def _wait_for_room_stats(
        self, hs: HomeServer, db: _Independent, names: dict[str, tuple[str | None, str | None]]
    ) -> None:
        """Until Synapse's stats handler (in the background) has every room's name."""
        for _ in range(600):
            query = "SELECT room_id, name, canonical_alias FROM room_stats_state"
            rows = {room: (name, alias) for room, name, alias in db.query(query)}
            if all(rows.get(room) == value for room, value in names.items()):
                return
            await hs.get_clock().sleep(Duration(milliseconds=50))
        self.fail(f"room_stats_state is not {names}: {rows}")

    @in_logcontext
    async def test_report_matches_the_database(self) -> None:
        hs: HomeServer = await self.make_homeserver({"mode": "shadow"})
        history = await build_history(hs)
        rooms = await realistic_history(
            hs,
            HistoryShape(rooms=3, big_room_members=40, small_room_members=4, events=150, seed=7),
            user_prefix="stats",
        )
        # A room known by its canonical alias, and one with neither name nor alias.
        d = Driver(hs)
        alias_room = await d.create_room(history.users[0], "public_chat", room_alias_name="stats")
        bare_room = await d.create_room(history.users[0], "private_chat")
        test_rooms = history.rooms + rooms + [alias_room, bare_room]
        names = await _names(hs, test_rooms)
        self.assertEqual(names[history.rooms[0]], ("Renamed", None))
        self.assertEqual(names[alias_room], (None, f"#stats:{hs.hostname}"))
        self.assertEqual(names[bare_room], (None, None))
        stores = hs.get_datastores()
        self.assertIs(stores.main.db_pool, stores.state.db_pool)
        db = _Independent(stores.main.db_pool, self.engine)
        self.addCleanup(db.close)
        db.freeze(SYNAPSE_STATE_TABLES + SYNAPSE_MAIN_TABLES + TABLES)
        await self._wait_for_room_stats(hs, db, names)

        report = await storage_report(hs, top=10)
        logger.info("stats report:\n%s", format_report(report))

        # Sizes and rows of every table, against the database's own functions.
        self._check_tables(report.synapse.tables, db, SYNAPSE_STATE_TABLES + SYNAPSE_MAIN_TABLES)
        self._check_tables(report.nidstate.tables, db, TABLES)
        self.assertEqual(report.engines, {"main": self.engine, "state": self.engine})
        self.assertFalse(report.separate_state_database)

        # Totals, state entries and the per-entry figures.
        for side in (report.synapse, report.nidstate):
            self.assertEqual(side.rows, sum(t.rows for t in side.tables))
            self.assertEqual(side.total_bytes, sum(t.total_bytes or 0 for t in side.tables))
            self.assertEqual(
                side.total_bytes,
                (side.table_bytes or 0) + (side.index_bytes or 0) + (side.toast_bytes or 0),
            )
            assert side.total_bytes is not None
            self.assertAlmostEqual(side.bytes_per_state_entry, side.total_bytes / side.state_entries)
        self.assertEqual(report.synapse.state_entries, db.count("state_groups_state"))
        (entries,), = db.query("SELECT SUM(entry_count) FROM nidstate_blocks")
        self.assertEqual(report.nidstate.state_entries, entries)
        self.assertGreater(report.nidstate.state_entries, 0)
        assert report.nidstate.total_bytes and report.synapse.total_bytes
        self.assertAlmostEqual(
            report.total_bytes_ratio, report.nidstate.total_bytes / report.synapse.total_bytes
        )

        # Top rooms: ranked by Synapse's rows, each with both sides' figures of
        # that one room and its name or alias, as computed here.
        module_rooms = self._module_rooms(db)
        expected = [
            (room, *names[room], rows, size, *module_rooms.get(room, (0, 0, 0)))
            for room, rows, size in self._synapse_rooms(db)
        ]
        self.assertEqual([attr.astuple(r) for r in report.top_rooms], expected[:10])
        self.assertEqual({r.room_id for r in report.top_rooms}, set(test_rooms))
        labels = {r.room_id: r.label for r in report.top_rooms}
        self.assertEqual(labels[history.rooms[0]], "Renamed")
        self.assertEqual(labels[alias_room], f"#stats:{hs.hostname}")
        self.assertEqual(labels[bare_room], bare_room)
        for r in report.top_rooms:
            assert r.nidstate_data_bytes is not None
            self.assertAlmostEqual(r.data_bytes_ratio, r.nidstate_data_bytes / r.synapse_data_bytes)
        # The biggest room of the generated history leads.
        self.assertEqual(report.top_rooms[0].room_id, rooms[0])
        small = await storage_report(hs, top=2)
        self.assertEqual(small.top_rooms, report.top_rooms[:2])
        none = await storage_report(hs, top=0)
        self.assertEqual(none.top_rooms, [])

        self._check_json(report)
        self._check_text(report)
        await self._check_run_and_plot(hs, report)

    def _check_json(self, report: StorageReport) -> None:
        data = json.loads(json.dumps(report_as_json(report)))
        units = data["units"]
        self.assertIn("bytes", units)

        def leaves(node: Any, path: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) or (
                        value is None and key not in _TEXT_KEYS
                    ):
                        self.assertTrue(
                            any(key == unit or key.endswith(f"_{unit}") for unit in units),
                            f"{path}.{key} has no unit",
                        )
                    if key.endswith("_bytes"):
                        self.assertIsInstance(value, (int, type(None)), f"{path}.{key}")
                    if path or key not in ("units", "notes"):  # those two are text
                        leaves(value, f"{path}.{key}")
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    leaves(value, f"{path}[{i}]")

        leaves(data, "")
        eq = self.assertEqual
        for key, side in (("synapse", report.synapse), ("nidstate", report.nidstate)):
            eq(data[key]["total_bytes"], side.total_bytes)
            eq(data[key]["state_entries"], side.state_entries)
            eq(data[key]["bytes_per_state_entry"], side.bytes_per_state_entry)
            eq(set(data[key]["tables"]), {t.name for t in side.tables})
            for t in side.tables:
                eq(data[key]["tables"][t.name]["total_bytes"], t.total_bytes)
                eq(data[key]["tables"][t.name]["rows"], t.rows)
        eq(
            data["top_rooms"],
            [
                {**attr.asdict(r), "label": r.label, "data_bytes_ratio": r.data_bytes_ratio}
                for r in report.top_rooms
            ],
        )
        self.assertIn("tombstones", data["notes"]["nidstate_entries"])
        self.assertIn("state_groups_state", data["notes"]["synapse_rows"])
        eq(data["nidstate_to_synapse_total_bytes_ratio"], report.total_bytes_ratio)
        eq(data["top_rooms_requested_count"], report.top)
        eq(data["engines"], report.engines)

    def _check_text(self, report: StorageReport) -> None:
        text = format_report(report)
        for needle in [SYNAPSE, NIDSTATE, "bytes per state entry"]:
            self.assertIn(needle, text)
        for t in report.synapse.tables + report.nidstate.tables:
            self.assertIn(t.name, text)
        self.assertIn(f"{report.synapse.total_bytes:,}", text)
        self.assertIn(f"{report.nidstate.total_bytes:,}", text)
        # One room a row: its name (or alias), its ID and both sides' figures.
        lines = text.splitlines()
        for r in report.top_rooms:
            (line,) = [line for line in lines if r.room_id in line]
            cells = [r.name or r.canonical_alias or "-", r.room_id, f"{r.synapse_rows:,}"]
            cells += [format_bytes(r.synapse_data_bytes), f"{r.nidstate_entries:,}"]
            cells += [format_bytes(r.nidstate_data_bytes), f"{r.data_bytes_ratio:.3f}"]
            self.assertEqual(re.split(r"\s{2,}", line.strip()), cells)
        # What each count is, under the table.
        words = " ".join(text.split())
        for needle in ("Synapse rows: the room's rows in state_groups_state",
                       "synapse-nidstate entries: the entries of the room's nidstate_blocks",
                       "after 100", "tombstones", "identical blocks are stored once"):
            self.assertIn(needle, words)

    def _check_plot(self, report: StorageReport) -> None:
        fig = draw_report(report)
        ax_tables, ax_entries, ax_bytes = fig.axes
        fig.canvas.draw()
        for ax in fig.axes:
            self.assertTrue(ax.get_xlabel(), ax.get_title())
        # Byte ticks a round binary step apart: 0, 10 KiB, 20 KiB... or 0, 0.5 MiB, 1 MiB...
        low, high = ax_tables.get_xlim()
        ticks = [t for t in ax_tables.get_xticks() if low <= t <= high]
        steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:])}
        self.assertEqual(len(steps), 1, ticks)
        self.assertTrue(_round_binary(steps.pop()), ticks)
        low, high = ax_bytes.get_xlim()
        for t in [t for t in ax_bytes.get_xticks() if low <= t <= high]:
            self.assertTrue(math.log2(t).is_integer(), t)
        # Rooms by name, log scales (small rooms' bars show), values written out.
        for ax in (ax_entries, ax_bytes):
            self.assertEqual(ax.get_xscale(), "log")
            self.assertEqual(
                [label.get_text().split("\n")[0] for label in ax.get_yticklabels()],
                [r.label for r in report.top_rooms],
            )
        values = {f"{n:,}" for r in report.top_rooms for n in (r.synapse_rows, r.nidstate_entries)}
        self.assertLessEqual(values, {t.get_text().strip() for t in ax_entries.texts})

    async def _check_run_and_plot(self, hs: HomeServer, report: StorageReport) -> None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--json", "--top", "3"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(await run(hs, args), 0)
        data = json.loads(out.getvalue())
        self.assertEqual(len(data["top_rooms"]), 3)
        self.assertEqual(data["synapse"]["total_bytes"], report.synapse.total_bytes)
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(["--top", "-1"])

        # Without matplotlib: a clear error, before any scan.
        path = os.path.join(temporary_directory(self, "nidstate-stats-"), "stats.png")
        with mock.patch.dict("sys.modules", {"matplotlib": None}):
            with self.assertRaises(RuntimeError) as missing:
                plot_report(report, path)
            self.assertIn("synapse-nidstate[plot]", str(missing.exception))
            with self.assertRaises(RuntimeError):
                await run(hs, parser.parse_args(["--plot", path]))
        if _matplotlib_missing():
            logger.warning("matplotlib is not installed: the plot is not checked")
            return
        self._check_plot(report)

        # A plot file that cannot be written: one line and exit code 2, before the scan.
        self.assertIsNone(plot_target_problem(path))
        self.assertFalse(os.path.exists(path))
        for target, why in (
            ("/no/such/dir/x.png", "no such directory: /no/such/dir"),
            (os.path.dirname(path), "it is a directory"),
            (path[: -len(".png")] + ".txt", "the chart is a PNG image: name the file FILE.png"),
        ):
            out, err = io.StringIO(), io.StringIO()
            with mock.patch.object(
                stats_command, "storage_report", side_effect=AssertionError("scanned")
            ), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                self.assertEqual(await run(hs, parser.parse_args(["--plot", target])), 2)
            self.assertEqual(out.getvalue(), "")
            self.assertEqual(
                err.getvalue(), f"synapse-nidstate: cannot write the plot to {target}: {why}\n"
            )
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(await run(hs, parser.parse_args(["--plot", path])), 0)
        self.assertIn("bytes per state entry", out.getvalue())
        with open(path, "rb") as f:
            png = f.read()
        self.assertEqual(png[:8], PNG_SIGNATURE)
        self.assertGreater(len(png), 10_000)

    @in_logcontext
    async def test_split_state_database(self) -> None:
        # State groups in a database of their own: Synapse's state tables are
        # measured there, event_to_state_groups and the module in main.
        main, state = self.database_config(), self.database_config()
        main["data_stores"] = ["main"]
        state["data_stores"] = ["state"]
        hs: HomeServer = await self.make_homeserver(
            {"mode": "shadow"}, extra_config={"databases": {"main": main, "state": state}}
        )
        history = await build_history(hs, messages_per_room=1)
        stores = hs.get_datastores()
        main_db = _Independent(stores.main.db_pool, self.engine)
        state_db = _Independent(stores.state.db_pool, self.engine)
        self.addCleanup(main_db.close)
        self.addCleanup(state_db.close)
        main_db.freeze(SYNAPSE_MAIN_TABLES + TABLES)
        state_db.freeze(SYNAPSE_STATE_TABLES)

        report = await storage_report(hs, top=5)
        self.assertTrue(report.separate_state_database)
        self._check_tables(report.synapse.tables[:3], state_db, SYNAPSE_STATE_TABLES)
        self._check_tables(report.synapse.tables[3:], main_db, SYNAPSE_MAIN_TABLES)
        self._check_tables(report.nidstate.tables, main_db, TABLES)
        databases = [t.database for t in report.synapse.tables]
        self.assertEqual(databases, ["state", "state", "state", "main"])
        self.assertGreater(report.synapse.state_entries, 0)
        self.assertEqual(report.synapse.state_entries, state_db.count("state_groups_state"))
        self.assertEqual({r.room_id for r in report.top_rooms}, set(history.rooms))
        for r in report.top_rooms:
            assert r.nidstate_entries is not None
            self.assertGreater(r.nidstate_entries, 0)
        self.assertIn("state database on", format_report(report))

    @in_logcontext
    async def test_without_the_module(self) -> None:
        # A server that never ran the module: Synapse's side alone, no ratio.
        hs: HomeServer = await self.make_homeserver(None)
        d = Driver(hs)
        room = await d.create_room(await d.register("alice"), "private_chat", name="Alone")
        report = await storage_report(hs)
        self.assertFalse(any(t.exists for t in report.nidstate.tables))
        self.assertTrue(all(t.exists for t in report.synapse.tables))
        self.assertIsNone(report.nidstate.total_bytes)
        self.assertIsNone(report.total_bytes_ratio)
        self.assertEqual(report.nidstate.state_entries, 0)
        (top,) = report.top_rooms
        self.assertEqual((top.room_id, top.nidstate_entries, top.data_bytes_ratio), (room, None, None))
        self.assertGreater(top.synapse_rows, 0)
        text = format_report(report)
        self.assertIn("do not exist", text)
        (line,) = [line for line in text.splitlines() if room in line]
        self.assertIn("n/a", line)
        data = report_as_json(report)
        self.assertIsNone(data["nidstate"]["total_bytes"])
        self.assertIsNone(data["top_rooms"][0]["nidstate_entries"])


class SqliteStatsTests(StatsTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresStatsTests(StatsTests, HomeserverTestCase):
    engine = "postgres"
