"""The storage layer's one IN-list clause, on each engine's real database."""

from synapse.storage.database import LoggingTransaction

from synapse_nidstate.storage import in_list_clause
from synapse_nidstate.storage.prepared import PreparedStatements
from tests.harness import HomeserverTestCase, in_logcontext

#: Strings an array literal or a JSON array must carry through unchanged.
AWKWARD = [
    "", "plain", "a,b", "{braces}", 'say "hi"', "back\\slash", "it's", "NULL", " pad ",
    '\\"', "tab\tand\nnewline", "h\u00e9llo \u2603", "{}", ",",
]


class InListClauseTests:
    @in_logcontext
    async def test_one_clause_answers_like_the_values(self) -> None:
        hs = await self.make_homeserver(None)
        db_pool = hs.get_datastores().main.db_pool
        engine = db_pool.engine
        prepared = PreparedStatements()

        def read_txn(txn: LoggingTransaction) -> dict[str, list]:
            txn.execute("CREATE TEMPORARY TABLE in_list_probe (n BIGINT, s TEXT)")
            txn.execute_batch(
                "INSERT INTO in_list_probe (n, s) VALUES (?, ?)",
                [(n, f"s{n}") for n in range(1, 3001)]
                + [(2**40 + i, s) for i, s in enumerate(AWKWARD)],
            )
            found: dict[str, list] = {}
            for name, column, values in (
                # Longer than SQLite's 999 variables; with values that match nothing.
                ("ints", "n", [*range(2, 3001, 2), 0, -5, 10**12, 2**40]),
                ("strings", "s", [*AWKWARD, "s7", "absent"]),
                ("one", "n", [3]),
                ("one string", "s", ["it's"]),
                ("empty", "n", []),
            ):
                clause, args = in_list_clause(engine, column, values)
                self.assertLessEqual(len(args), 1, name)  # one parameter, whatever the length
                sql = f"SELECT n, s FROM in_list_probe WHERE {clause} ORDER BY n"
                txn.execute(sql, args)
                found[name] = txn.fetchall()
                # The same, prepared (PostgreSQL; SQLite runs it as given), twice.
                for _ in range(2):
                    prepared.execute(txn, "in_list_probe", sql, args)
                    self.assertEqual(txn.fetchall(), found[name], name)
            txn.execute("DROP TABLE in_list_probe")
            return found

        found = await db_pool.runInteraction("in_list_probe", read_txn)
        self.assertEqual(
            found["ints"], [(n, f"s{n}") for n in range(2, 3001, 2)] + [(2**40, AWKWARD[0])]
        )
        self.assertEqual(
            found["strings"],
            [(7, "s7")] + [(2**40 + i, s) for i, s in enumerate(AWKWARD)],
        )
        self.assertEqual(found["one"], [(3, "s3")])
        self.assertEqual(found["empty"], [])


class InListClauseSQLiteTests(InListClauseTests, HomeserverTestCase):
    engine = "sqlite"


class InListClausePostgresTests(InListClauseTests, HomeserverTestCase):
    engine = "postgres"
