"""End to end: a real Synapse process, the client-server API, and the module's three modes.

One Synapse process is started with the module in mode ``serve``; three users
build a room's history over HTTP (joins, messages, topic, name, power-level and
history-visibility changes, a leave, a kick, an invite and a re-join) and then
ask the state-at-event questions clients ask: ``/context``, ``/messages``
(with and without lazy-loaded members), ``/members?at=`` and an initial
``/sync``. The same server (same database) is then restarted with the module
in mode ``mirror`` (Synapse answers natively), ``shadow`` (Synapse answers,
the module compares) and ``serve`` again (cold caches), replaying exactly the
same requests: every answer must equal the native one, and the module's
Prometheus counters must show that it served and compared lookups without a
mismatch.
"""

import json
import os
import shutil
import signal
import socket
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
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from synapse_nidstate.demo.history import ROOM_VERSION
from synapse_nidstate.demo.listen import free_port

SERVER_NAME = "nidstate.e2e"
REPO_ROOT = Path(__file__).resolve().parent.parent
USERS = ("alice", "bob", "carol")
PASSWORD = "nidstate-e2e-password"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0
SCRIPT_TIMEOUT = 60.0

LAZY = json.dumps({"lazy_load_members": True}, separators=(",", ":"))
LAZY_ROOM_FILTER = json.dumps(
    {"room": {"state": {"lazy_load_members": True}}}, separators=(",", ":")
)
GENEROUS = {"per_second": 100000, "burst_count": 100000}


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class HttpError(Exception):
    pass


def http_request(
    base_url: str,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    timeout: float = REQUEST_TIMEOUT,
) -> tuple[int, Any]:
    """(status, decoded JSON body) of a client-API request; never raises for an
    HTTP error status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = raw.decode(errors="replace")
        return e.code, decoded


class SynapseProcess:
    """``python -m synapse.app.homeserver`` on a data directory, with one module mode."""

    def __init__(
        self, data_dir: str, mode: str, module_config: dict[str, Any] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.mode = mode
        #: More of the module's configuration than its mode.
        self.module_config = module_config or {}
        self.config_path = os.path.join(data_dir, "homeserver.yaml")
        self.log_path = os.path.join(data_dir, "homeserver.log")
        self.stdout_path = os.path.join(data_dir, f"stdout-{mode}.log")
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = (
            str(REPO_ROOT) + os.pathsep + existing if existing else str(REPO_ROOT)
        )
        return env

    def write_config(self) -> None:
        if not os.path.exists(self.config_path):
            subprocess.run(
                [
                    sys.executable, "-m", "synapse.app.homeserver",
                    "--generate-config",
                    "--server-name", SERVER_NAME,
                    "--config-path", self.config_path,
                    "--report-stats=no",
                ],
                cwd=self.data_dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=SCRIPT_TIMEOUT,
                check=True,
            )
        with open(self.config_path) as f:
            config = yaml.safe_load(f)
        config.update(
            {
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "tls": False,
                        "x_forwarded": False,
                        "resources": [{"names": ["client"], "compress": False}],
                    },
                    {
                        "port": self.metrics_port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "metrics",
                    },
                ],
                "enable_metrics": True,
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "federation_sender_instances": [],
                "report_stats": False,
                "database": {
                    "name": "sqlite3",
                    "args": {"database": os.path.join(self.data_dir, "homeserver.db")},
                },
                "rc_message": GENEROUS,
                "rc_registration": GENEROUS,
                "rc_room_creation": GENEROUS,
                "rc_login": {
                    "address": GENEROUS,
                    "account": GENEROUS,
                    "failed_attempts": GENEROUS,
                },
                "rc_joins": {"local": GENEROUS, "remote": GENEROUS},
                "rc_invites": {
                    "per_room": GENEROUS,
                    "per_user": GENEROUS,
                    "per_issuer": GENEROUS,
                },
                "modules": [
                    {
                        "module": "synapse_nidstate.NidStateModule",
                        "config": {**self.module_config, "mode": self.mode},
                    }
                ],
            }
        )
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)

    def start(self) -> None:
        self.write_config()
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", self.config_path],
                cwd=self.data_dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"Synapse (mode {self.mode}) exited with {self.proc.returncode} "
                    f"at start-up:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.base_url}/_matrix/client/versions", timeout=2
                ) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Synapse (mode {self.mode}) did not answer /versions within "
                    f"{START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.stdout_path, self.log_path):
            try:
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path} ---\n{''.join(tail)}")
        return "\n".join(parts)

    def register(self, localpart: str, admin: bool = False) -> None:
        """Shared-secret registration with Synapse's own script."""
        result = subprocess.run(
            [
                sys.executable, "-m", "synapse._scripts.register_new_matrix_user",
                "-c", self.config_path,
                "-u", localpart,
                "-p", PASSWORD,
                "--admin" if admin else "--no-admin",
                self.base_url,
            ],
            cwd=self.data_dir,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SCRIPT_TIMEOUT,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"register_new_matrix_user {localpart} exited with {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}"
                f"{result.stderr.decode(errors='replace')}"
            )

    def request(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body); never raises for an HTTP error status."""
        return http_request(self.base_url, method, path, token, body)

    def ok(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        status, answer = self.request(method, path, token, body)
        if status != 200:
            raise HttpError(f"{method} {path} -> {status}: {answer}")
        return answer

    def metric_value(self, sample_name: str, **labels: str) -> float:
        """The value of one sample of this server's metrics (0 if absent)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/_synapse/metrics", timeout=REQUEST_TIMEOUT
        ) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == sample_name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        return 0.0

    def lookup_counts(self) -> dict[str, float]:
        """synapse_nidstate_lookups_total by outcome, from the metrics listener."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/_synapse/metrics", timeout=REQUEST_TIMEOUT
        ) as response:
            text = response.read().decode()
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "synapse_nidstate_lookups":
                continue
            for sample in family.samples:
                if (
                    sample.name == "synapse_nidstate_lookups_total"
                    and sample.labels.get("server_name") == SERVER_NAME
                ):
                    counts[sample.labels["outcome"]] = sample.value
        if not counts:
            raise AssertionError(
                "no synapse_nidstate_lookups_total samples in the metrics:\n"
                + "\n".join(line for line in text.splitlines() if "nidstate" in line)
            )
        return counts


# --- normalising answers -----------------------------------------------------------


def _event(event: dict[str, Any]) -> tuple[str, str, str]:
    """An event as its id, type and content (``unsigned`` holds ages, left out)."""
    return (
        event.get("event_id", ""),
        event.get("type", ""),
        json.dumps(event.get("content"), sort_keys=True),
    )


def _events(events: list[dict[str, Any]] | None) -> list[tuple[str, str, str]]:
    return [_event(e) for e in events or []]


def _state(events: list[dict[str, Any]] | None) -> list[tuple[str, str, str]]:
    return sorted(_events(events))


def normalise(kind: str, status: int, answer: Any) -> Any:
    """The comparable part of an answer (no tokens, ages or other per-process values)."""
    if status != 200:
        errcode = answer.get("errcode") if isinstance(answer, dict) else None
        return {"status": status, "errcode": errcode}
    if kind == "messages":
        return {"chunk": _events(answer.get("chunk")), "state": _state(answer.get("state"))}
    if kind == "context":
        return {
            "event": _event(answer.get("event", {})),
            "events_before": _events(answer.get("events_before")),
            "events_after": _events(answer.get("events_after")),
            "state": _state(answer.get("state")),
        }
    if kind == "members":
        return _state(answer.get("chunk"))
    if kind == "sync":
        rooms = answer.get("rooms", {})
        return {
            section: {
                room_id: {
                    "timeline": _events(room.get("timeline", {}).get("events")),
                    "limited": room.get("timeline", {}).get("limited"),
                    "state": _state(room.get("state", {}).get("events")),
                }
                for room_id, room in sorted(rooms.get(section, {}).items())
            }
            for section in ("join", "invite", "leave")
        }
    raise ValueError(kind)


def describe_difference(want: Any, got: Any, want_name: str, got_name: str, where: str = "") -> str:
    """Where two normalised answers differ, compactly (events as id and type)."""
    if isinstance(want, dict) and isinstance(got, dict):
        return "".join(
            describe_difference(want.get(k), got.get(k), want_name, got_name, f"{where}.{k}")
            for k in sorted(want.keys() | got.keys(), key=str)
            if want.get(k) != got.get(k)
        )
    if isinstance(want, list) and isinstance(got, list):
        want_items = [tuple(i) if isinstance(i, list) else i for i in want]
        got_items = [tuple(i) if isinstance(i, list) else i for i in got]
        only_want = [i for i in want_items if i not in got_items]
        only_got = [i for i in got_items if i not in want_items]

        def show(items: list[Any]) -> str:
            return ", ".join(
                f"{i[1]} {i[0]}" if isinstance(i, tuple) and len(i) == 3 else repr(i)
                for i in items
            )

        if not only_want and not only_got:
            return f"    {where or 'answer'}: same items, different order\n"
        return (
            f"    {where or 'answer'}: only in {want_name}: [{show(only_want)}]; "
            f"only in {got_name}: [{show(only_got)}]\n"
        )
    return f"    {where or 'answer'}: {want_name} {want!r}, {got_name} {got!r}\n"


# --- the scenario -----------------------------------------------------------------


class Client:
    def __init__(self, server: SynapseProcess, user: str, token: str) -> None:
        self.server = server
        self.user = user
        self.user_id = f"@{user}:{SERVER_NAME}"
        self.token = token
        self._txn = 0

    def send(self, room_id: str, text: str) -> str:
        self._txn += 1
        return self.server.ok(
            "PUT",
            f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/e2e-{self._txn}",
            self.token,
            {"msgtype": "m.text", "body": text},
        )["event_id"]

    def state(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        return self.server.ok(
            "PUT",
            f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}",
            self.token,
            content,
        )["event_id"]

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.server.ok("POST", path, self.token, body)


def build_room(server: SynapseProcess, tokens: dict[str, str]) -> str:
    """The room's history, written over the client-server API; returns the room id."""
    alice, bob, carol = (Client(server, u, tokens[u]) for u in USERS)
    room_id = alice.post(
        "/_matrix/client/v3/createRoom",
        # Version 12 on every supported Synapse (1.157 defaults to 10, where the
        # power-level changes below would take the creator's power).
        {"preset": "public_chat", "name": "E2E room", "topic": "the first topic",
         "room_version": ROOM_VERSION},
    )["room_id"]
    rooms = f"/_matrix/client/v3/rooms/{q(room_id)}"
    bob.post(f"{rooms}/join", {})
    carol.post(f"{rooms}/join", {})
    counter = iter(range(1, 100))

    def say(client: Client) -> None:
        client.send(room_id, f"message {next(counter)} from {client.user}")

    for client in (alice, bob, carol):
        say(client)
    alice.state(room_id, "m.room.topic", {"topic": "the second topic"})
    for client in (bob, alice, carol):
        say(client)
    alice.state(room_id, "m.room.name", {"name": "E2E room, renamed"})
    for client in (carol, bob):
        say(client)
    power_levels = server.ok("GET", f"{rooms}/state/m.room.power_levels", alice.token)
    # Room version 12: the creator has infinite power and must not be listed.
    users = power_levels.setdefault("users", {})
    users.pop(alice.user_id, None)
    users[bob.user_id] = 50
    alice.state(room_id, "m.room.power_levels", power_levels)
    for client in (bob, alice):
        say(client)
    bob.state(room_id, "m.room.topic", {"topic": "bob's topic"})
    alice.state(room_id, "m.room.history_visibility", {"history_visibility": "joined"})
    for client in (carol, bob):
        say(client)
    bob.post(f"{rooms}/leave", {})
    for client in (alice, carol):
        say(client)
    alice.post(f"{rooms}/kick", {"user_id": carol.user_id, "reason": "e2e"})
    say(alice)
    alice.post(f"{rooms}/invite", {"user_id": carol.user_id})
    say(alice)
    carol.post(f"{rooms}/join", {})
    for client in (carol, alice, carol, alice):
        say(client)
    return room_id


Request = tuple[str, str, str]  # kind, user, path


class Recorder:
    """Asks the first server; records each request and its normalised answer."""

    def __init__(self, server: SynapseProcess, tokens: dict[str, str]) -> None:
        self.server = server
        self.tokens = tokens
        self.requests: list[Request] = []
        self.answers: list[Any] = []

    def get(self, kind: str, user: str, path: str) -> tuple[int, Any]:
        status, answer = self.server.request("GET", path, self.tokens[user])
        if status >= 500:
            raise HttpError(f"GET {path} as {user} -> {status}: {answer}")
        self.requests.append((kind, user, path))
        self.answers.append(normalise(kind, status, answer))
        return status, answer


def record(server: SynapseProcess, tokens: dict[str, str], room_id: str) -> Recorder:
    """Ask the state-at-event questions; every request is recorded for the replays."""
    rec = Recorder(server, tokens)
    rooms = f"/_matrix/client/v3/rooms/{q(room_id)}"
    lazy = f"filter={q(LAZY)}"

    _, everything = rec.get("messages", "alice", f"{rooms}/messages?dir=b&limit=100")
    timeline = [e["event_id"] for e in reversed(everything["chunk"])]
    assert len(timeline) > 30, everything

    for user in USERS:
        stream_tokens = []
        for query in ("dir=b&limit=50", f"dir=b&limit=50&{lazy}"):
            status, answer = rec.get("messages", user, f"{rooms}/messages?{query}")
            if status == 200:
                stream_tokens += [answer.get("start"), answer.get("end")]
        rec.get("members", user, f"{rooms}/members")
        for token in filter(None, stream_tokens):
            rec.get("members", user, f"{rooms}/members?at={q(token)}")
        for sync_filter in (
            {"room": {"include_leave": True, "timeline": {"limit": 5}}},
            {
                "room": {
                    "include_leave": True,
                    "timeline": {"limit": 3},
                    "state": {"lazy_load_members": True},
                }
            },
        ):
            encoded = q(json.dumps(sync_filter, separators=(",", ":")))
            rec.get("sync", user, f"/_matrix/client/v3/sync?filter={encoded}")

    # /context at every event of the timeline, as every user, with and without
    # lazy-loaded members; the answers' tokens then feed /members?at= and
    # /messages?from= (both directions, small pages).
    for position, event_id in enumerate(timeline):
        for user in USERS:
            queries = ["limit=5", f"limit=5&{lazy}"] if user == "alice" else ["limit=3"]
            for query in queries:
                status, answer = rec.get(
                    "context", user, f"{rooms}/context/{q(event_id)}?{query}"
                )
                if status != 200 or position % 3 != user_index(user):
                    continue
                for token in filter(None, (answer.get("start"), answer.get("end"))):
                    rec.get("members", user, f"{rooms}/members?at={q(token)}")
                    rec.get(
                        "members",
                        user,
                        f"{rooms}/members?at={q(token)}&membership=join",
                    )
                    for direction in ("b", "f"):
                        rec.get(
                            "messages",
                            user,
                            f"{rooms}/messages?from={q(token)}&dir={direction}&limit=4&{lazy}",
                        )

    # Forward pagination over the whole room in small lazy-loading pages.
    for user in ("alice", "carol"):
        token: str | None = None
        for _ in range(30):
            from_ = f"from={q(token)}&" if token else ""
            status, page = rec.get(
                "messages", user, f"{rooms}/messages?{from_}dir=f&limit=4&{lazy}"
            )
            token = page.get("end") if status == 200 else None
            if not token or not page.get("chunk"):
                break
    return rec


def user_index(user: str) -> int:
    return USERS.index(user)


def replay(server: SynapseProcess, tokens: dict[str, str], requests: list[Request]) -> list[Any]:
    answers = []
    for kind, user, path in requests:
        status, answer = server.request("GET", path, tokens[user])
        answers.append(normalise(kind, status, answer))
    return answers


class ServerTestCase(unittest.TestCase):
    """Tests that start ``python -m synapse.app.homeserver`` on a data directory."""

    timeout = 300

    def setUp(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="nidstate-e2e-")
        if not os.environ.get("NIDSTATE_E2E_KEEP"):
            self.addCleanup(shutil.rmtree, self.data_dir, True)

    def start(self, mode: str, module_config: dict[str, Any] | None = None) -> SynapseProcess:
        server = SynapseProcess(self.data_dir, mode, module_config)
        self.addCleanup(server.stop)
        server.start()
        return server

    def assertSameAnswers(
        self,
        requests: list[Request],
        expected: list[Any],
        actual: list[Any],
        expected_mode: str,
        actual_mode: str,
    ) -> None:
        differing = [
            (request, want, got)
            for request, want, got in zip(requests, expected, actual, strict=True)
            if want != got
        ]
        if differing:
            shown = "\n".join(
                f"  {kind} as {user}: GET {urllib.parse.unquote(path)}\n"
                + describe_difference(want, got, expected_mode, actual_mode)
                for (kind, user, path), want, got in differing[:5]
            )
            self.fail(
                f"{len(differing)} of {len(requests)} answers differ between modes "
                f"{expected_mode} and {actual_mode}; the first ones:\n{shown}"
            )


class EndToEndTest(ServerTestCase):
    """A real Synapse process; answers in modes serve and shadow equal mode mirror's."""

    def test_modes_give_synapses_answers(self) -> None:
        # Mode serve: build the room, ask everything, record the answers.
        server = self.start("serve")
        for user in USERS:
            server.register(user)
        tokens = {
            user: server.ok(
                "POST",
                "/_matrix/client/v3/login",
                body={
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": user},
                    "password": PASSWORD,
                },
            )["access_token"]
            for user in USERS
        }
        room_id = build_room(server, tokens)
        rec = record(server, tokens, room_id)
        requests, served_answers = rec.requests, rec.answers
        self.assertGreater(len(requests), 200)
        counts = server.lookup_counts()
        self.assertGreater(counts.get("served", 0), 0, counts)
        self.assertEqual(counts.get("mismatched", 0), 0, counts)
        # Latency histograms: lookups answered by the mirror, mirror writes.
        self.assertGreater(
            server.metric_value(
                "synapse_nidstate_lookup_seconds_count", server_name=SERVER_NAME, path="mirror"
            ),
            0,
        )
        self.assertGreater(
            server.metric_value(
                "synapse_nidstate_mirror_write_seconds_count", server_name=SERVER_NAME
            ),
            0,
        )
        server.stop()

        # Mode mirror: Synapse's own lookups, on the same database.
        server = self.start("mirror")
        native_answers = replay(server, tokens, requests)
        counts = server.lookup_counts()
        self.assertEqual(counts.get("served", 0), 0, counts)
        self.assertEqual(counts.get("compared", 0), 0, counts)
        server.stop()
        self.assertSameAnswers(requests, native_answers, served_answers, "mirror", "serve")

        # Mode shadow: Synapse answers, the module compares every lookup.
        server = self.start("shadow")
        shadow_answers = replay(server, tokens, requests)
        counts = server.lookup_counts()
        self.assertGreater(counts.get("compared", 0), 0, counts)
        self.assertEqual(counts.get("mismatched", 0), 0, counts)
        server.stop()
        self.assertSameAnswers(requests, native_answers, shadow_answers, "mirror", "shadow")

        # Mode serve again, caches cold: only the mirror's tables answer.
        server = self.start("serve")
        cold_answers = replay(server, tokens, requests)
        counts = server.lookup_counts()
        self.assertGreater(counts.get("served", 0), 0, counts)
        self.assertEqual(counts.get("fallback", 0), 0, counts)
        server.stop()
        self.assertSameAnswers(
            requests, native_answers, cold_answers, "mirror", "serve (restarted)"
        )


class FreePortTests(unittest.TestCase):
    """The ports real Synapse processes are given (``demo/listen.py``)."""

    def test_below_the_ephemeral_range_and_never_twice(self) -> None:
        from synapse_nidstate.demo.listen import ephemeral_start

        start = ephemeral_start()
        ports = [free_port() for _ in range(200)]
        self.assertEqual(len(set(ports)), len(ports))
        self.assertTrue(all(1024 <= port < start for port in ports), ports)

    def test_a_port_something_listens_on_is_not_given(self) -> None:
        from unittest import mock

        from synapse_nidstate.demo import listen

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            # Only that port in range: free_port must refuse it.
            with mock.patch.object(listen, "ephemeral_start", return_value=port + 1), \
                    mock.patch.object(listen, "SPAN", 1):
                with self.assertRaises(OSError):
                    listen.free_port()
