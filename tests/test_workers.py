"""A real Synapse worker deployment with the module in every process.

Main process, two event persisters (``stream_writers: events``; rooms are
sharded between them by Synapse's hash of the room ID) and a worker that only
reads client requests, on PostgreSQL with Redis replication, each its own
``python -m synapse.app.*`` process with the module in mode ``serve``. Users
send messages and state changes concurrently into rooms owned by both
persisters; then ``synapse-nidstate verify`` finds no mismatch and no orphan,
every event with a state group has its snapshot, every NID is unique, the
persisters (and only they) mirrored events, and the reading worker answered
``/messages`` and ``/context`` from the mirror. Meanwhile the main process's
background job reclaims the state groups' rows; the reader then reads groups
whose rows are gone.
"""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml
from synapse.config._base import RoutableShardedWorkerHandlingConfig
from twisted.trial import unittest

from tests.harness import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    create_postgres_database,
    drop_postgres_database,
    postgres_available,
    temporary_directory,
)
from tests.test_e2e import (
    GENEROUS,
    LAZY,
    PASSWORD,
    REPO_ROOT,
    SERVER_NAME,
    HttpError,
    free_port,
    http_request,
    q,
)

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PERSISTERS = ("persister1", "persister2")
START_TIMEOUT = 90.0


def redis_available() -> str | None:
    import socket

    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=5) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                return "Redis did not answer PING"
    except OSError as e:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT}: {e}"
    return None


class Process:
    """One Synapse process of the deployment."""

    def __init__(self, deployment: "Deployment", name: str, client_port: int | None) -> None:
        self.deployment = deployment
        self.name = name
        self.client_port = client_port
        self.stdout_path = os.path.join(deployment.data_dir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        d = self.deployment
        if self.name == "main":
            command = [sys.executable, "-m", "synapse.app.homeserver", "-c", d.config_path]
        else:
            command = [
                sys.executable, "-m", "synapse.app.generic_worker",
                "-c", d.config_path, "-c", d.worker_config(self.name),
            ]
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=d.data_dir, env=d.env(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        """Until the process answers HTTP (its client or replication listener)."""
        port = self.client_port or self.deployment.replication_ports[self.name]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=2
                ):
                    return
            except urllib.error.HTTPError:
                return  # a replication listener answers, with 404
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.stdout_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def request(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> Any:
        status, answer = http_request(self.base_url, method, path, token, body, timeout=60)
        if status != 200:
            raise HttpError(f"{self.name}: {method} {path} -> {status}: {answer!r}")
        return answer


class Deployment:
    def __init__(self, data_dir: str, database: str) -> None:
        self.data_dir = data_dir
        self.database = database
        self.config_path = os.path.join(data_dir, "homeserver.yaml")
        self.replication_ports = {name: free_port() for name in ("main", *PERSISTERS)}
        self.main = Process(self, "main", free_port())
        self.persisters = [Process(self, name, free_port()) for name in PERSISTERS]
        self.reader = Process(self, "reader", free_port())

    @property
    def processes(self) -> list[Process]:
        return [self.main, *self.persisters, self.reader]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    def write_config(self) -> None:
        subprocess.run(
            [
                sys.executable, "-m", "synapse.app.homeserver", "--generate-config",
                "--server-name", SERVER_NAME, "--config-path", self.config_path,
                "--report-stats=no",
            ],
            cwd=self.data_dir, env=self.env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60, check=True,
        )
        with open(self.config_path) as f:
            config = yaml.safe_load(f)
        config.pop("log_config", None)  # each process logs to its own file
        config.update(
            {
                "listeners": [
                    {
                        "port": self.main.client_port, "bind_addresses": ["127.0.0.1"],
                        "type": "http", "tls": False,
                        "resources": [{"names": ["client"], "compress": False}],
                    },
                    {
                        "port": self.replication_ports["main"], "bind_addresses": ["127.0.0.1"],
                        "type": "http", "tls": False,
                        "resources": [{"names": ["replication"]}],
                    },
                ],
                "database": {
                    "name": "psycopg2",
                    "args": {
                        "host": PG_HOST, "port": PG_PORT, "user": PG_USER,
                        "database": self.database, "cp_min": 1, "cp_max": 5,
                    },
                },
                "redis": {"enabled": True, "host": REDIS_HOST, "port": REDIS_PORT},
                "instance_map": {
                    name: {"host": "127.0.0.1", "port": port}
                    for name, port in self.replication_ports.items()
                },
                "stream_writers": {"events": list(PERSISTERS)},
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "federation_sender_instances": [],
                "report_stats": False,
                "rc_message": GENEROUS,
                "rc_registration": GENEROUS,
                "rc_room_creation": GENEROUS,
                "rc_joins": {"local": GENEROUS, "remote": GENEROUS},
                "rc_login": {"address": GENEROUS, "account": GENEROUS, "failed_attempts": GENEROUS},
                "modules": [
                    {
                        "module": "synapse_nidstate.NidStateModule",
                        # The main process reclaims state groups while the
                        # persisters write new ones and the reader reads them.
                        "config": {
                            "mode": "serve",
                            "reclaim": {"enabled": True, "interval_ms": 100, "batch_size": 10},
                        },
                    }
                ],
            }
        )
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    def worker_config(self, name: str) -> str:
        path = os.path.join(self.data_dir, f"{name}.yaml")
        listeners = []
        if name in self.replication_ports:
            listeners.append(
                {
                    "type": "http", "port": self.replication_ports[name],
                    "bind_addresses": ["127.0.0.1"], "resources": [{"names": ["replication"]}],
                }
            )
        process = next(p for p in self.processes if p.name == name)
        if process.client_port is not None:
            # The module's status endpoint is served on client listeners.
            listeners.append(
                {
                    "type": "http", "port": process.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "resources": [{"names": ["client"], "compress": False}],
                }
            )
        with open(path, "w") as f:
            yaml.safe_dump(
                {
                    "worker_app": "synapse.app.generic_worker",
                    "worker_name": name,
                    "worker_listeners": listeners,
                },
                f,
            )
        return path

    def start(self) -> None:
        self.write_config()
        # The main process first: it brings Synapse's schema (and the module's) up.
        self.main.start()
        self.main.wait_ready()
        for process in (*self.persisters, self.reader):
            process.start()
        for process in (*self.persisters, self.reader):
            process.wait_ready()

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def register(self, localpart: str, admin: bool = False) -> str:
        subprocess.run(
            [
                sys.executable, "-m", "synapse._scripts.register_new_matrix_user",
                "-c", self.config_path, "-u", localpart, "-p", PASSWORD,
                "--admin" if admin else "--no-admin", self.main.base_url,
            ],
            cwd=self.data_dir, env=self.env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60, check=True,
        )
        answer = self.main.request(
            "POST", "/_matrix/client/v3/login", body={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": PASSWORD,
            },
        )
        return answer["access_token"]


class WorkersTest(unittest.TestCase):
    timeout = 900

    def setUp(self) -> None:
        for problem in (postgres_available(), redis_available()):
            if problem is not None:
                if os.environ.get("CI"):
                    self.fail(f"PostgreSQL and Redis are required in CI: {problem}")
                raise unittest.SkipTest(problem)
        self.database = create_postgres_database()
        self.addCleanup(drop_postgres_database, self.database)
        self.deployment = Deployment(temporary_directory(self, "nidstate-workers-"), self.database)
        self.addCleanup(self.deployment.stop)
        self.deployment.start()

    def sql(self, query: str) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.database)
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall()
        finally:
            conn.close()

    def status(self, process: Process, token: str) -> dict[str, Any]:
        return process.request("GET", "/_synapse/nidstate/v1/status", token)

    def test_persisters_mirror_and_the_reader_serves(self) -> None:
        d = self.deployment
        admin = d.register("admin", admin=True)
        users = [d.register(f"user{i}") for i in range(4)]
        me = [f"@user{i}:{SERVER_NAME}" for i in range(4)]

        # Rooms until both persisters own some (Synapse's own sharding function).
        shards = RoutableShardedWorkerHandlingConfig(list(PERSISTERS))
        rooms: list[str] = []
        while len(rooms) < 4 or len({shards.get_instance(r) for r in rooms}) < 2:
            self.assertLess(len(rooms), 20, "20 rooms, all on one persister")
            answer = d.main.request(
                "POST", "/_matrix/client/v3/createRoom", users[0], {"preset": "public_chat"}
            )
            rooms.append(answer["room_id"])
        for room_id in rooms:
            for token in users[1:]:
                d.main.request("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/join", token, {})

        # Concurrent traffic into every room: messages, topics, leaves and re-joins.
        def traffic(room_index: int) -> None:
            room_id = rooms[room_index]
            for n in range(12):
                token = users[n % len(users)]
                path = f"/_matrix/client/v3/rooms/{q(room_id)}"
                if n % 6 == 3:
                    d.main.request("PUT", f"{path}/state/m.room.topic/", users[0], {"topic": f"t{n}"})
                elif n % 6 == 5 and n % len(users):
                    d.main.request("POST", f"{path}/leave", token, {})
                    d.main.request("POST", f"{path}/join", token, {})
                else:
                    d.main.request(
                        "PUT", f"{path}/send/m.room.message/t{room_index}-{n}", token,
                        {"msgtype": "m.text", "body": f"message {n}"},
                    )

        with ThreadPoolExecutor(max_workers=len(rooms)) as pool:
            list(pool.map(traffic, range(len(rooms))))

        # The main process's background job reclaims every group with a snapshot
        # (it ran during the traffic too); the reader then reads reclaimed groups.
        deadline = time.monotonic() + 120
        while True:
            reclaim = self.status(d.main, admin)["reclaim"]
            if reclaim["groups_left"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual(reclaim["groups_left"], 0, reclaim)
        self.assertGreater(reclaim["groups_reclaimed"], 20, reclaim)
        self.assertEqual(reclaim["here"]["groups_refused"], 0, reclaim)
        self.assertTrue(reclaim["background"])

        # Reads on the reading worker: /messages (lazy-loaded members) and /context.
        for room_id in rooms:
            deadline = time.monotonic() + 30
            while True:  # until replication has brought the room's events there
                page = d.reader.request(
                    "GET",
                    f"/_matrix/client/v3/rooms/{q(room_id)}/messages?dir=b&limit=50&filter={q(LAZY)}",
                    users[1],
                )
                if len(page["chunk"]) >= 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            self.assertGreaterEqual(len(page["chunk"]), 20)
            for event in page["chunk"][:10]:
                context = d.reader.request(
                    "GET",
                    f"/_matrix/client/v3/rooms/{q(room_id)}/context/{q(event['event_id'])}"
                    "?limit=5",
                    users[1],
                )
                self.assertEqual(context["event"]["event_id"], event["event_id"])
                self.assertTrue(context["state"])

        # Who mirrored what: the persisters only, both of them.
        statuses = {p.name: self.status(p, admin) for p in d.processes}
        for name in ("main", "reader"):
            self.assertFalse(statuses[name]["persists_events"], name)
            self.assertEqual(statuses[name]["counters"]["mirror"]["events_mirrored"], 0, name)
        for name in PERSISTERS:
            self.assertTrue(statuses[name]["persists_events"], name)
            mirror = statuses[name]["counters"]["mirror"]
            self.assertGreater(mirror["events_mirrored"], 0, name)
            self.assertEqual(mirror["unprepared"], 0, name)
            self.assertEqual(mirror["write_failures"], 0, name)
        # The reading worker answered from the mirror, without a mismatch.
        lookups = statuses["reader"]["counters"]["lookups"]
        self.assertGreater(lookups["served"], 0, lookups)
        self.assertEqual(lookups["mismatched"], 0)
        # Only the main process reclaimed.
        for name in (*PERSISTERS, "reader"):
            self.assertFalse(statuses[name]["reclaim"]["background"], name)
            self.assertEqual(statuses[name]["counters"]["reclaim"]["groups_reclaimed"], 0, name)

        # Every event's state group has its snapshot; every NID is unique.
        (missing,) = self.sql(
            "SELECT COUNT(*) FROM event_to_state_groups AS esg"
            " LEFT JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
            " WHERE g.state_group IS NULL"
        )
        self.assertEqual(missing, (0,))
        for table, column in (
            ("nidstate_events", "event_id"),
            ("nidstate_rooms", "room_id"),
            ("nidstate_event_types", "event_type"),
            ("nidstate_state_keys", "state_key"),
        ):
            ((rows, distinct),) = self.sql(f"SELECT COUNT(*), COUNT(DISTINCT {column}) FROM {table}")
            self.assertEqual(rows, distinct, table)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM nidstate_rooms"), [(len(rooms),)])
        for user in me:
            self.assertEqual(
                self.sql(f"SELECT COUNT(*) FROM nidstate_state_keys WHERE state_key = '{user}'"),
                [(1,)],
            )

        # And the operator's verify agrees, for every event.
        result = subprocess.run(
            [sys.executable, "-m", "synapse_nidstate.cli", "verify", "-c", d.config_path,
             "--no-progress"],
            cwd=d.data_dir, env=d.env(), capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("mismatches: 0", result.stdout)
        self.assertIn("orphans: 0 state groups", result.stdout)
