"""docs/operating.md, tried as written, on a real Synapse.

    python scripts/operating_guide.py [--postgres DSN [--workers]] [--keep] [--show]

Starts ``python -m synapse.app.homeserver`` on a configuration Synapse
generates (SQLite; ``--postgres`` names a server whose database this creates;
``--workers`` adds an event persister, ``synapse.app.generic_worker``, that
persists every event, replicating over Redis on 127.0.0.1:6379), without the
module; registers a server admin and writes a history over the
client-server API (a room, members, state changes, messages). Then it reads
docs/operating.md and does, in order, what its ``<!-- guide: ... -->``
markers say:

* ``run``: the next ``sh`` block, with bash, in the directory of
  ``homeserver.yaml``, with ``SYNAPSE_URL`` and ``ADMIN_TOKEN`` set and this
  environment's ``synapse-nidstate`` on ``PATH``; it must exit with 0;
* ``expect``: every line of the next ``text`` block must be in what the last
  ``run`` printed (``<n>`` a number, ``<...>`` anything);
* ``config``: the next ``yaml`` block replaces those keys of
  ``homeserver.yaml``;
* ``restart``: stops Synapse (every process) and starts it again (waits until
  each answers).

Between the steps, Synapse keeps getting messages, as a live server does. At
the end, every answer of ``/context`` at the history's events is the one
Synapse gave before the module was enabled. Exit code 0 when every step did
what the guide says; 1 (naming the step) otherwise.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from synapse_nidstate.demo.listen import free_port

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "operating.md"
SERVER_NAME = "guide.example"
PASSWORD = "operating-guide-password"
WORKER = "persister1"
MARKER = re.compile(r"<!-- guide: (\w+) -->")
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


class GuideError(Exception):
    pass


def steps(text: str) -> list[tuple[str, str, int]]:
    """(action, the block it takes or "", line) for every marker of the guide."""
    found = []
    for marker in MARKER.finditer(text):
        action = marker.group(1)
        line = text.count("\n", 0, marker.start()) + 1
        if action == "restart":
            found.append((action, "", line))
            continue
        block = FENCE.search(text, marker.end())
        if block is None or text[marker.end():block.start()].strip():
            raise GuideError(f"docs/operating.md:{line}: `{action}` is not followed by a block")
        found.append((action, block.group(2), line))
    return found


def expected(line: str) -> re.Pattern[str]:
    pattern = re.escape(line.strip())
    pattern = pattern.replace(re.escape("<n>"), r"[0-9][0-9,.]*").replace(re.escape("<...>"), ".*")
    return re.compile(pattern)


class Synapse:
    """``python -m synapse.app.homeserver`` on a directory of its own."""

    def __init__(self, directory: str, database: dict[str, Any], workers: bool = False) -> None:
        self.directory = directory
        self.config_path = os.path.join(directory, "homeserver.yaml")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: The processes, main first: (its command, its port to wait for, the process).
        self.processes: list[list[Any]] = [
            [["synapse.app.homeserver", "-c", self.config_path], self.port, None]
        ]
        subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver", "--generate-config",
             "--server-name", SERVER_NAME, "--config-path", self.config_path,
             "--report-stats=no"],
            cwd=directory, check=True, capture_output=True, timeout=120,
        )
        generous = {"per_second": 10000, "burst_count": 10000}
        self.update({
            "listeners": [{"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http",
                           "tls": False, "resources": [{"names": ["client"], "compress": False}]}],
            "database": database,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "rc_message": generous,
            "rc_login": {"address": generous, "account": generous, "failed_attempts": generous},
            "rc_joins": {"local": generous, "remote": generous},
        })
        if workers:
            self.add_event_persister()

    def add_event_persister(self) -> None:
        """A worker deployment: the main process and one event persister (every
        event is persisted, so mirrored, by the worker), over Redis."""
        ports = {"main": free_port(), WORKER: free_port()}
        replication = [{"names": ["replication"]}]
        with open(self.config_path) as f:
            listeners = yaml.safe_load(f)["listeners"]
        self.update({
            "listeners": [*listeners, {"port": ports["main"], "bind_addresses": ["127.0.0.1"],
                                       "type": "http", "tls": False, "resources": replication}],
            "redis": {"enabled": True, "host": "127.0.0.1", "port": 6379},
            "instance_map": {name: {"host": "127.0.0.1", "port": port}
                             for name, port in ports.items()},
            "stream_writers": {"events": [WORKER]},
        })
        worker_config = os.path.join(self.directory, f"{WORKER}.yaml")
        with open(worker_config, "w") as f:
            yaml.safe_dump({
                "worker_app": "synapse.app.generic_worker", "worker_name": WORKER,
                "worker_listeners": [{"type": "http", "port": ports[WORKER],
                                      "bind_addresses": ["127.0.0.1"], "resources": replication}],
            }, f)
        self.processes.append(
            [["synapse.app.generic_worker", "-c", self.config_path, "-c", worker_config],
             ports[WORKER], None]
        )

    def update(self, keys: dict[str, Any]) -> None:
        with open(self.config_path) as f:
            config = yaml.safe_load(f)
        config.update(keys)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    def start(self) -> None:
        """Every process, main first (it brings the schemas up), each until it answers."""
        for process in self.processes:
            name = process[0][0].rpartition(".")[2]
            log = open(os.path.join(self.directory, f"{name}-stdout.log"), "ab")  # noqa: SIM115
            process[2] = subprocess.Popen(
                [sys.executable, "-m", *process[0]], cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
            self.wait(name, process[2], process[1])

    def wait(self, name: str, proc: "subprocess.Popen[bytes]", port: int) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GuideError(f"{name} exited with {proc.returncode} at start-up "
                                 f"(see {self.directory})")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=2
                ):
                    return
            except urllib.error.HTTPError:
                return  # a replication listener answers, with 404
            except OSError:
                time.sleep(0.3)
        raise GuideError(f"{name} did not answer within 90 s")

    def stop(self) -> None:
        for process in reversed(self.processes):
            proc, process[2] = process[2], None
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)

    def request(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def user(self, name: str, admin: bool) -> str:
        """Register ``name`` with Synapse's own script; its access token."""
        subprocess.run(
            [sys.executable, "-m", "synapse._scripts.register_new_matrix_user", "-c",
             self.config_path, "-u", name, "-p", PASSWORD, "--admin" if admin else "--no-admin",
             self.url],
            cwd=self.directory, check=True, capture_output=True, timeout=120,
        )
        return self.request("POST", "/_matrix/client/v3/login", body={
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": name},
            "password": PASSWORD,
        })["access_token"]


class History:
    """A room with members, state changes and messages; more as the guide goes."""

    def __init__(self, synapse: Synapse, admin: str, users: list[str]) -> None:
        self.synapse, self.admin, self.users = synapse, admin, users
        self.room = synapse.request("POST", "/_matrix/client/v3/createRoom", admin,
                                    {"preset": "public_chat", "name": "Guide"})["room_id"]
        self.path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(self.room)}"
        for token in users:
            synapse.request("POST", f"{self.path}/join", token, {})
        self.sent = 0
        self.more(20)

    def more(self, n: int) -> None:
        for _ in range(n):
            self.sent += 1
            token = ([self.admin] + self.users)[self.sent % (len(self.users) + 1)]
            if self.sent % 7 == 0:
                self.synapse.request("PUT", f"{self.path}/state/m.room.topic", self.admin,
                                     {"topic": f"topic {self.sent}"})
            else:
                self.synapse.request("PUT", f"{self.path}/send/m.room.message/t{self.sent}",
                                     token, {"msgtype": "m.text", "body": f"hello {self.sent}"})

    def answers(self) -> dict[str, Any]:
        """``/context`` at every event of the room: its state, as a client sees it."""
        page = self.synapse.request("GET", f"{self.path}/messages?dir=b&limit=500", self.admin)
        answers = {}
        for event in page["chunk"]:
            context = self.synapse.request(
                "GET", f"{self.path}/context/{urllib.parse.quote(event['event_id'])}?limit=0",
                self.admin,
            )
            answers[event["event_id"]] = sorted(
                (e["type"], e["state_key"], e["event_id"]) for e in context["state"]
            )
        return answers


def run_guide(synapse: Synapse, history: History, env: dict[str, str], show: bool) -> None:
    output = ""
    for number, (action, block, line) in enumerate(steps(GUIDE.read_text()), start=1):
        where = f"step {number} (docs/operating.md:{line}, {action})"
        print(f"{where}: {block.strip().splitlines()[0] if block.strip() else ''}", flush=True)
        if action == "run":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block],
                                    cwd=synapse.directory, env=env, capture_output=True,
                                    text=True, timeout=600)
            output = result.stdout + result.stderr
            if show:
                print(output, flush=True)
            if result.returncode != 0:
                raise GuideError(f"{where}: exit code {result.returncode}:\n{output}")
        elif action == "expect":
            for wanted in filter(str.strip, block.splitlines()):
                if not expected(wanted).search(output):
                    raise GuideError(f"{where}: {wanted!r} is not in the output:\n{output}")
        elif action == "config":
            synapse.update(yaml.safe_load(block))
        elif action == "restart":
            synapse.stop()
            synapse.start()
        else:
            raise GuideError(f"{where}: unknown action")
        history.more(3)  # a live server: messages keep coming


def postgres_admin(dsn: str, *statements: str) -> None:
    import psycopg2

    conn = psycopg2.connect(f"{dsn} dbname=postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def persisted_by(dsn: str, name: str) -> set[str]:
    """The processes that persisted the history's events (Synapse's ``events.instance_name``)."""
    import psycopg2

    conn = psycopg2.connect(f"{dsn} dbname={name}")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT DISTINCT instance_name FROM events")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", metavar="DSN",
                        help="libpq DSN of a PostgreSQL server (without dbname)")
    parser.add_argument("--workers", action="store_true",
                        help="the main process and an event persister, over Redis on "
                             "127.0.0.1:6379 (needs --postgres)")
    parser.add_argument("--keep", action="store_true", help="keep Synapse's directory")
    parser.add_argument("--show", action="store_true", help="print what each command printed")
    args = parser.parse_args()
    if args.workers and not args.postgres:
        parser.error("--workers needs --postgres: Synapse's workers do not run on SQLite")
    directory = tempfile.mkdtemp(prefix="nidstate-guide-")
    name = f"nidstate_guide_{os.getpid()}"
    if args.postgres:
        postgres_admin(args.postgres, f"DROP DATABASE IF EXISTS {name}",
                       f"CREATE DATABASE {name} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        parsed = dict(part.split("=", 1) for part in args.postgres.split())
        database = {"name": "psycopg2", "args": {**parsed, "database": name}}
    else:
        database = {"name": "sqlite3", "args": {"database": os.path.join(directory, "homeserver.db")}}
    synapse = Synapse(directory, database, workers=args.workers)
    try:
        synapse.start()
        admin = synapse.user("admin", admin=True)
        users = [synapse.user(name, admin=False) for name in ("alice", "bob")]
        history = History(synapse, admin, users)
        before = history.answers()
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "SYNAPSE_URL": synapse.url,
            "ADMIN_TOKEN": admin,
        }
        run_guide(synapse, history, env, args.show)
        after = history.answers()
        changed = [e for e, state in before.items() if after.get(e) != state]
        if changed:
            raise GuideError(f"after the guide, /context differs at {len(changed)} events")
        if args.workers:
            persisters = persisted_by(args.postgres, database["args"]["database"])
            if persisters != {WORKER}:
                raise GuideError(f"events were persisted by {sorted(persisters)}, not {WORKER}")
        print(f"the guide ran as written: {len(before)} events answered as before, "
              f"{history.sent} messages sent along the way")
        return 0
    except GuideError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        synapse.stop()
        if args.keep:
            print(f"kept: {directory}" + (f" and the database {name}" if args.postgres else ""))
        else:
            shutil.rmtree(directory, ignore_errors=True)
            if args.postgres:
                postgres_admin(args.postgres, f"DROP DATABASE IF EXISTS {name}")


if __name__ == "__main__":
    sys.exit(main())
