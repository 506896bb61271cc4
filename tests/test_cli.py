"""The `synapse-nidstate` command line as an operator meets it.

Bad input is one line ``synapse-nidstate: ...`` on standard error and exit code
2, never a traceback: a demo's unusable ``--postgres`` database (checked before
Synapse starts), a module config value Synapse's loader rejects (its reason
kept), an SQLite database that does not exist (never created by a command), a
database that is not Synapse's, a ``--room`` the server does not have. Also:
every subcommand's ``--help`` says what it does, whether it is safe beside a
running Synapse and its exit codes; the demo names its data directory only if
it outlives the run.
"""

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml
from twisted.trial import unittest

from synapse_nidstate import cli
from synapse_nidstate.demo import demo as demo_module
from synapse_nidstate.demo.history import Driver
from synapse_nidstate.demo.inprocess import homeserver_config, sqlite_database
from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    HomeserverTestCase,
    create_postgres_database,
    drop_postgres_database,
    in_logcontext,
    postgres_available,
    temporary_directory,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DEMO = [
    "--rooms", "1", "--events", "12", "--big-room-members", "2",
    "--small-room-members", "1", "--timing-events", "1", "--no-progress",
]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synapse_nidstate.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def write_config(
    data_dir: str, database: dict[str, Any], module_config: dict[str, Any] | None = None
) -> str:
    config = homeserver_config(data_dir, database, module_config or {"mode": "serve"})
    path = os.path.join(data_dir, "homeserver.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


class CliTestCase(unittest.TestCase):
    def tmpdir(self, prefix: str = "nidstate-cli-") -> str:
        return temporary_directory(self, prefix)

    def assertInputError(
        self, result: subprocess.CompletedProcess, *fragments: str
    ) -> str:
        """Exit code 2 and one line ``synapse-nidstate: ...`` holding every fragment."""
        output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        self.assertEqual(result.returncode, 2, output)
        self.assertNotIn("Traceback", result.stderr, output)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, output)
        self.assertTrue(lines[0].startswith("synapse-nidstate: "), output)
        for fragment in fragments:
            self.assertIn(fragment, lines[0], output)
        return lines[0]

    def require_postgres(self) -> None:
        problem = postgres_available()
        if problem is not None:
            if os.environ.get("CI"):
                self.fail(f"PostgreSQL at {PG_HOST}:{PG_PORT} is required in CI: {problem}")
            raise unittest.SkipTest(problem)


class HelpTests(CliTestCase):
    def help_of(self, command: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            cli.main([command, "--help"])
        self.assertEqual(caught.exception.code, 0)
        return " ".join(out.getvalue().split())

    def test_every_subcommand_says_what_it_does(self) -> None:
        for command, says in [
            ("demo", "never touches a running Synapse"),
            ("migrate", "Safe while Synapse runs"),
            ("verify", "Safe while Synapse runs"),
            ("stats", "Read-only: safe while Synapse runs"),
            ("drop", "Not meant to run beside a Synapse that loads the module"),
        ]:
            text = self.help_of(command)
            self.assertIn(says, text, command)
            self.assertIn("exit codes: 0", text, command)
            self.assertIn(" 2 bad ", text, command)

    def test_postgres_option_shows_an_example(self) -> None:
        text = self.help_of("demo")
        self.assertIn('e.g. "host=127.0.0.1 port=5432 user=postgres dbname=nidstate_demo"', text)
        self.assertIn("LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0", text)


class DemoPostgresTests(CliTestCase):
    """An unusable --postgres database is refused before Synapse starts."""

    def demo(self, dsn: str) -> subprocess.CompletedProcess:
        # No data directory is made: the check comes first.
        tmp = self.tmpdir("nidstate-cli-tmp-")
        result = run_cli("demo", *TINY_DEMO, "--postgres", dsn, env={**os.environ, "TMPDIR": tmp})
        self.assertEqual(os.listdir(tmp), [], result.stderr)
        return result

    def test_malformed_dsn(self) -> None:
        self.assertInputError(
            self.demo(f"host={PG_HOST} port"),
            "--postgres: not a libpq connection string",
            'e.g. "host=127.0.0.1 port=5432 user=postgres dbname=nidstate_demo"',
        )
        self.assertInputError(self.demo(f"host={PG_HOST} user={PG_USER}"), "names no database")

    def test_closed_port(self) -> None:
        import socket

        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.assertInputError(
            self.demo(f"host=127.0.0.1 port={port} user={PG_USER} dbname=nidstate_x"),
            "cannot connect to PostgreSQL",
            "Connection refused",
        )

    def test_missing_database(self) -> None:
        self.require_postgres()
        name = "nidstate_cli_missing_database"
        drop_postgres_database(name)
        self.assertInputError(
            self.demo(f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={name}"),
            f"the database '{name}' does not exist",
            f"CREATE DATABASE {name} LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0",
        )

    def test_wrong_collation_and_non_empty_database(self) -> None:
        self.require_postgres()
        import psycopg2

        name = "nidstate_cli_not_c"
        drop_postgres_database(name)
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            # A locale of the server's operating system other than C (POSIX is C).
            cur.execute(
                "SELECT collcollate FROM pg_collation WHERE collprovider = 'c'"
                " AND collcollate NOT IN ('C', 'POSIX') AND collencoding IN (-1, 6)"
                " ORDER BY collcollate LIMIT 1"
            )
            row = cur.fetchone()
            if row is not None:
                locale = row[0]
                cur.execute(
                    f"CREATE DATABASE {name} LC_COLLATE '{locale}' LC_CTYPE '{locale}'"
                    " ENCODING 'UTF8' TEMPLATE template0"
                )
        conn.close()
        if row is not None:
            self.addCleanup(drop_postgres_database, name)
            self.assertInputError(
                self.demo(f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={name}"),
                f"has collation '{locale}'",
                "Synapse needs 'C'",
                "LC_COLLATE='C'",
            )
            # A command on a homeserver.yaml naming such a database: Synapse's
            # own reason, as a sentence (it was printed as a Python tuple).
            database = {
                "name": "psycopg2",
                "args": {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "database": name},
            }
            result = run_cli("stats", "-c", write_config(self.tmpdir(), database))
            self.assertInputError(
                result,
                "cannot open Synapse's databases: Database has incorrect collation of "
                f"'{locale}'. Should be 'C'",
            )
            self.assertNotIn("('", result.stderr)

        used = create_postgres_database()
        self.addCleanup(drop_postgres_database, used)
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=used)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE events (event_id TEXT)")
        conn.commit()
        conn.close()
        self.assertInputError(
            self.demo(f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={used}"),
            "is not empty (1 tables)",
        )


class DemoDataDirectoryTests(CliTestCase):
    """Without --keep, a path is printed only if it outlives the run."""

    timeout = 300

    def test_successful_demo_names_no_removed_path(self) -> None:
        tmp = self.tmpdir("nidstate-cli-tmp-")
        result = run_cli("demo", *TINY_DEMO, env={**os.environ, "TMPDIR": tmp})
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("RESULT: OK", result.stdout)
        self.assertEqual(os.listdir(tmp), [])
        self.assertNotIn(tmp, result.stdout + result.stderr)
        self.assertNotIn("Synapse's log", result.stdout + result.stderr)
        self.assertIn("on SQLite in a temporary directory", result.stdout)

    def in_process_demo(self, outcome: Any) -> tuple[Any, str, str]:
        """cli.main(["demo"]) with run_demo replaced: (code or exception, data dir, stderr)."""
        tmp = self.tmpdir("nidstate-cli-tmp-")
        self.patch(tempfile, "tempdir", tmp)
        seen: list[str] = []

        def fake_run_demo(args: Any, data_dir: str) -> int:
            seen.append(data_dir)
            with open(os.path.join(data_dir, "homeserver.log"), "w") as f:
                f.write("Synapse's log\n")
            if isinstance(outcome, BaseException):
                raise outcome
            return int(outcome)

        self.patch(demo_module, "run_demo", fake_run_demo)
        err = io.StringIO()
        result: Any
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                result = cli.main(["demo"])
            except BaseException as e:
                result = e
        return result, seen[0], err.getvalue()

    def test_failed_demo_keeps_its_directory_and_says_where(self) -> None:
        code, data_dir, err = self.in_process_demo(1)
        self.assertEqual(code, 1)
        self.assertTrue(os.path.exists(os.path.join(data_dir, "homeserver.log")))
        self.assertIn(f"the demo failed; its data directory is kept: {data_dir}", err)
        self.assertIn(f"{data_dir}/homeserver.log", err)

        error, data_dir, err = self.in_process_demo(RuntimeError("boom"))
        self.assertIsInstance(error, RuntimeError)
        self.assertTrue(os.path.exists(os.path.join(data_dir, "homeserver.log")))
        self.assertIn(
            f"the demo stopped before its end; its data directory is kept: {data_dir}", err
        )

    def test_successful_demo_removes_its_directory(self) -> None:
        code, data_dir, err = self.in_process_demo(0)
        self.assertEqual(code, 0)
        self.assertFalse(os.path.exists(data_dir))
        self.assertEqual(err, "")


class ConfigErrorTests(CliTestCase):
    """Synapse's loader keeps a module's reason as the cause; the command prints it."""

    def test_module_config_errors_keep_their_reason(self) -> None:
        data_dir = self.tmpdir()
        database = sqlite_database(data_dir)
        for module_config, key, reason in [
            ({"mode": "servee"}, ".mode", "'servee' is not one of ['mirror', 'shadow', 'serve']"),
            (
                {"block_cache_size": "abc"},
                ".block_cache_size",
                "'abc' is not of type 'integer'",
            ),
            (
                {"colour": "blue"},
                "",
                "Additional properties are not allowed ('colour' was unexpected)",
            ),
            ({"reclaim": {"batch_size": 0}}, ".reclaim.batch_size", "0 is less than the minimum of 1"),
            ({1: "x"}, "", "Additional properties are not allowed (1 was unexpected)"),
        ]:
            config = write_config(data_dir, database, module_config)
            self.assertInputError(
                run_cli("verify", "-c", config), f"at 'modules.<item 0>.config{key}': ", reason
            )


class DatabaseTests(CliTestCase):
    """Every command refuses a database Synapse did not make, and creates none."""

    def test_missing_sqlite_database_is_not_created(self) -> None:
        data_dir = self.tmpdir()
        path = os.path.join(data_dir, "no-such.db")
        config = write_config(data_dir, {"name": "sqlite3", "args": {"database": path}})
        media = os.path.join(data_dir, "media")  # the config's media_store_path
        for command in (["verify"], ["stats"], ["drop", "--yes"], ["migrate"]):
            line = self.assertInputError(
                run_cli(*command, "-c", config),
                f"the database of {config} does not exist: no SQLite file {path}",
                "database.args.database",
            )
            self.assertNotIn("worker", line)
            self.assertFalse(os.path.exists(path), command)
            # Nothing left behind: Synapse's config parsing made the media
            # store's directory, the failed command removes it.
            self.assertFalse(os.path.exists(media), command)
        self.assertEqual(sorted(os.listdir(data_dir)), ["homeserver.yaml"])

    def test_empty_sqlite_file_is_not_a_synapse_database(self) -> None:
        import sqlite3

        data_dir = self.tmpdir()
        path = os.path.join(data_dir, "empty.db")
        open(path, "w").close()
        config = write_config(data_dir, {"name": "sqlite3", "args": {"database": path}})
        line = self.assertInputError(
            run_cli("stats", "-c", config), f"{path}, is an empty file, not a Synapse database"
        )
        self.assertNotIn("worker", line)
        self.assertEqual(os.path.getsize(path), 0)  # left as it was

        other = sqlite3.connect(path)  # an SQLite database, but not Synapse's
        other.execute("CREATE TABLE notes (body TEXT)")
        other.commit()
        other.close()
        line = self.assertInputError(
            run_cli("verify", "-c", config), "is not a Synapse database (it has no Synapse tables)"
        )
        self.assertNotIn("worker", line)

    def test_empty_postgres_database_is_not_a_synapse_database(self) -> None:
        self.require_postgres()
        name = create_postgres_database()
        self.addCleanup(drop_postgres_database, name)
        data_dir = self.tmpdir()
        config = write_config(
            data_dir,
            {
                "name": "psycopg2",
                "args": {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "database": name},
            },
        )
        line = self.assertInputError(
            run_cli("verify", "-c", config), "is not a Synapse database"
        )
        self.assertNotIn("worker", line)


class ServerTests(HomeserverTestCase, CliTestCase):
    """Commands on a database a real Synapse wrote (SQLite), the module live."""

    engine = "sqlite"

    async def server_with_a_room(self) -> tuple[str, str]:
        database = self.database_config()
        hs = await self.make_homeserver({"mode": "serve"}, database=database)
        driver = Driver(hs)
        alice = await driver.register("alice")
        room_id = await driver.create_room(alice, "private_chat")
        await self.stop_homeserver(hs)
        return write_config(self.tmpdir(), database), room_id

    @in_logcontext
    async def test_unknown_room_is_an_error(self) -> None:
        config, room_id = await self.server_with_a_room()
        for command in ("verify", "reclaim", "restore"):  # worded alike by every command
            self.assertInputError(
                run_cli(command, "-c", config, "--room", "!nope:x"),
                "--room !nope:x: this server (nidstate.test) has no such room",
            )
        known = run_cli("verify", "-c", config, "--room", room_id)
        self.assertEqual(known.returncode, 0, known.stdout + known.stderr)
        self.assertRegex(known.stdout, r"verified [1-9][0-9]* events")

    @in_logcontext
    async def test_migrate_with_nothing_to_do_shows_no_progress(self) -> None:
        config, _ = await self.server_with_a_room()
        for _ in range(2):  # the second run has nothing to do
            result = run_cli("migrate", "-c", config)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("migrated 0 events", result.stdout)
        self.assertNotIn("0/1", result.stderr)
        self.assertNotIn("migrating:", result.stderr)

    @in_logcontext
    async def test_drop_without_yes_off_a_terminal(self) -> None:
        config, _ = await self.server_with_a_room()
        self.assertInputError(
            run_cli("drop", "-c", config), "refusing to drop without --yes"
        )
        self.assertEqual(run_cli("verify", "-c", config).returncode, 0)  # nothing dropped


class WordingTests(unittest.TestCase):
    def test_counts_take_the_number_of_their_noun(self) -> None:
        from synapse_nidstate.commands.ui import counted

        self.assertEqual(counted(1, "batch", "batches"), "1 batch")
        self.assertEqual(counted(2, "batch", "batches"), "2 batches")
        self.assertEqual(counted(0, "state group"), "0 state groups")
        self.assertEqual(counted(1, "state group"), "1 state group")
        self.assertEqual(counted(12_345, "row"), "12,345 rows")


def _importing_synapse(pid: int) -> bool:
    """Whether process `pid` has loaded Synapse's compiled extension: it is
    in the command, importing Synapse (what the CLI's own handling covers;
    before it, Python's start-up and the import of the CLI module, where
    Ctrl-C ends any Python program with Python's own traceback)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "synapse_rust" in maps.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


class EarlySignalTests(unittest.TestCase):
    def test_ctrl_c_while_the_command_starts(self) -> None:
        # SIGINT while the command imports Synapse and opens its databases
        # (its first seconds; the reactor's handler takes over later): one
        # line, exit code 130, never a traceback. The command here would end
        # with exit code 2 (no such homeserver.yaml) some seconds in.
        #
        # Each delay counts from a sign that the command runs (Synapse's
        # compiled extension loaded), not from the fork: how long Python
        # takes to get there depends on the machine's load.
        config = os.path.join(temporary_directory(self, "nidstate-cli-"), "homeserver.yaml")
        signalled = 0
        for delay in (0.0, 0.3, 0.8, 1.5):
            process = subprocess.Popen(
                [sys.executable, "-m", "synapse_nidstate.cli", "stats", "-c", config],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                # As from a terminal (a shell without job control starts
                # background jobs with SIGINT ignored; children inherit it).
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            deadline = time.monotonic() + 60
            while not _importing_synapse(process.pid) and process.poll() is None:
                self.assertLess(time.monotonic(), deadline, "it never imported Synapse")
                time.sleep(0.005)
            time.sleep(delay)
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                signalled += 1
            _, stderr = process.communicate(timeout=60)
            if process.returncode == 2:
                continue  # it had already read the missing file: too late for this test
            self.assertEqual(process.returncode, 130, (delay, stderr))
            self.assertNotIn("Traceback", stderr, delay)
            self.assertEqual(
                stderr.strip().splitlines(),
                ["synapse-nidstate: stats interrupted; run it again to go on"],
                delay,
            )
        self.assertGreaterEqual(signalled, 3)
