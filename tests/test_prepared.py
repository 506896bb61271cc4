"""The module's read statements, prepared once per connection on PostgreSQL
(``storage/prepared.py``)."""

import re
from typing import Any

from synapse.server import HomeServer
from synapse.storage.database import LoggingTransaction
from synapse.types.state import StateFilter

from synapse_nidstate.storage.prepared import PreparedStatements
from tests.harness import HomeserverTestCase, SqlStatements, in_logcontext
from tests.test_timing_alone import history_group, synapse_answer


def numbered(sql: list[str]) -> list[str]:
    """Statements with each prepared statement's number (process-wide: it
    depends on what ran before) replaced by its order of first appearance."""
    order: dict[str, str] = {}

    def renumber(match: re.Match) -> str:
        return order.setdefault(match.group(0), f"_#{len(order) + 1}")

    return [re.sub(r"_\d+(?=\(|$)", renumber, s) for s in sql]


def module_statements(statements: SqlStatements) -> list[str]:
    """The module's statements of a read (Synapse's own left out)."""
    return [sql for sql in statements.sql if "nidstate_" in sql]


class PreparedPostgresTests(HomeserverTestCase):
    engine = "postgres"

    def one_connection(self) -> dict[str, Any]:
        """The database with a pool of one connection: every read on it."""
        config = self.database_config()
        config["args"].update(cp_min=1, cp_max=1)
        return config

    async def cold_read(self, hs: HomeServer, group: int, state_filter: StateFilter) -> tuple[dict, list[str]]:
        """The group's state read by the module from cold (its caches and
        Synapse's emptied), and its statements."""
        self.module(hs).lookups.clear_caches(hs)
        state = hs.get_datastores().state
        with SqlStatements() as statements:
            answer = await state._get_state_for_groups([group], state_filter)
        return dict(answer[group]), module_statements(statements)

    @in_logcontext
    async def test_each_read_statement_is_prepared_once_per_connection(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"}, database=self.one_connection())
        group, state_filter = await history_group(hs)
        expected = await synapse_answer(hs, group, state_filter)
        answer, first = await self.cold_read(hs, group, state_filter)
        self.assertEqual(answer, expected)
        prepared = [sql for sql in first if sql.startswith("PREPARE nidstate_")]
        self.assertTrue(prepared, first)
        self.assertTrue(all(sql.startswith(("PREPARE ", "EXECUTE ")) for sql in first), first)
        answer, second = await self.cold_read(hs, group, state_filter)
        self.assertEqual(answer, expected)
        # The same statements, run as prepared: none prepared again.
        self.assertEqual(len(second), len(prepared), second)
        self.assertTrue(all(sql.startswith("EXECUTE nidstate_") for sql in second), second)

    @in_logcontext
    async def test_statements_the_server_lost_are_prepared_again(self) -> None:
        """A connection whose statements are gone (``DISCARD ALL``, a pooler):
        the read that finds it out is run again by Synapse (psycopg2 raises an
        ``OperationalError``) and prepares them again, answered by the mirror;
        the third time, the process stops preparing them."""
        hs = await self.make_homeserver({"mode": "serve"}, database=self.one_connection())
        module = self.module(hs)
        group, state_filter = await history_group(hs)
        expected = await synapse_answer(hs, group, state_filter)
        await self.cold_read(hs, group, state_filter)
        served, failed = module.stats.group_reads.served, module.stats.group_reads.failed

        async def lose_statements() -> None:
            await hs.get_datastores().main.db_pool.runInteraction(
                "nidstate_test_deallocate", lambda txn: txn.execute("DEALLOCATE ALL")
            )

        for losses in range(1, 4):
            await lose_statements()
            answer, statements = await self.cold_read(hs, group, state_filter)
            self.assertEqual(answer, expected)
            self.assertEqual(module.stats.group_reads.failed, failed)
            self.assertEqual(module.stats.group_reads.served, served + losses)
            self.assertEqual(module.store.prepared.losses, losses)
            self.assertTrue(statements[0].startswith("EXECUTE nidstate_"), statements)
            if losses < 3:
                self.assertTrue(
                    any(sql.startswith("PREPARE nidstate_") for sql in statements), statements
                )
        self.assertFalse(module.store.prepared.enabled)
        answer, statements = await self.cold_read(hs, group, state_filter)
        self.assertEqual(answer, expected)
        self.assertTrue(statements)
        self.assertFalse(
            [sql for sql in statements if sql.startswith(("PREPARE", "EXECUTE"))], statements
        )

    @in_logcontext
    async def test_off_runs_statements_as_given(self) -> None:
        hs = await self.make_homeserver({"mode": "serve", "prepared_statements": False})
        group, state_filter = await history_group(hs)
        expected = await synapse_answer(hs, group, state_filter)
        answer, statements = await self.cold_read(hs, group, state_filter)
        self.assertEqual(answer, expected)
        self.assertTrue(statements)
        self.assertFalse(
            [sql for sql in statements if sql.startswith(("PREPARE", "EXECUTE"))], statements
        )

    @in_logcontext
    async def test_at_most_so_many_statements_a_connection(self) -> None:
        hs = await self.make_homeserver(None, database=self.one_connection())
        prepared = PreparedStatements(most=2)

        def run_txn(txn: LoggingTransaction) -> list[int]:
            answers = []
            for n in range(3):
                prepared.execute(txn, "probe", f"SELECT ? + {n}", [n])
                answers.append(txn.fetchone()[0])
            return answers

        with SqlStatements("probe") as statements:
            for _ in range(2):
                self.assertEqual(
                    await hs.get_datastores().main.db_pool.runInteraction("probe", run_txn),
                    [0, 2, 4],
                )
        self.assertEqual(
            numbered([sql.split(" AS ")[0] for sql in statements.sql]),
            [
                "PREPARE nidstate_probe_#1", "EXECUTE nidstate_probe_#1(?)",
                "PREPARE nidstate_probe_#2", "EXECUTE nidstate_probe_#2(?)", "SELECT ? + 2",
                "EXECUTE nidstate_probe_#1(?)", "EXECUTE nidstate_probe_#2(?)", "SELECT ? + 2",
            ],
        )

    @in_logcontext
    async def test_two_instances_on_one_connection(self) -> None:
        """Two module instances in one process (Synapse's tests run a worker's
        homeserver beside the main one, on the same connections) prepare the
        same statement under two names: neither's PREPARE is refused."""
        hs = await self.make_homeserver(None, database=self.one_connection())
        first, second = PreparedStatements(), PreparedStatements()

        def run_txn(txn: LoggingTransaction) -> list[int]:
            answers = []
            for prepared in (first, second, first, second):
                prepared.execute(txn, "probe", "SELECT ? + 1", [1])
                answers.append(txn.fetchone()[0])
            return answers

        with SqlStatements("probe") as statements:
            answers = await hs.get_datastores().main.db_pool.runInteraction("probe", run_txn)
        self.assertEqual(answers, [2, 2, 2, 2])
        self.assertEqual(
            numbered([sql.split(" AS ")[0] for sql in statements.sql]),
            [
                "PREPARE nidstate_probe_#1", "EXECUTE nidstate_probe_#1(?)",
                "PREPARE nidstate_probe_#2", "EXECUTE nidstate_probe_#2(?)",
                "EXECUTE nidstate_probe_#1(?)", "EXECUTE nidstate_probe_#2(?)",
            ],
        )
        self.assertEqual((first.losses, second.losses), (0, 0))
