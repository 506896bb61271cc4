"""Reclaim beside live traffic: a real Synapse process, clients sending, the job on and off.

    python -m benchmarks.live [--scale M | --dataset DIR] [--seconds 90] [--rate 8]
                              [--state-rate 2] [--configs serve,job,...] [--breakdown]
                              [--verify-sample N] [--json FILE]

On the PostgreSQL dataset ``python -m benchmarks.run`` keeps for the scale
(written first if there is none), or the one ``scripts/hq_scale.py
--write-only`` wrote in ``--dataset DIR`` (its local users are the clients),
each configuration gets a fresh copy of the
database (``CREATE DATABASE ... TEMPLATE``), the module's tables dropped and,
where the module runs, the history migrated (``migrate``); then a real
``python -m synapse.app.homeserver`` process and clients over HTTP:

* senders, each a member of the room it sends to (six in the big room, one in
  each of four small rooms), each on a fixed schedule (open loop: ``--rate``
  messages a second in all);
* state changes, ``--state-rate`` a second in all: users join a room and
  leave it again, two in the big room and one in each small room (each a
  membership event: a new state group);
* a reader, ``--read-rate`` requests a second: ``/context`` of a message
  from the big room's history (the state at a past event, members
  lazy-loaded: cold reads) and the big room's latest page of ``/messages``.

Every request's latency is recorded (``PUT /send`` and ``PUT /state`` answer
once the event is persisted; joins and leaves too); the first ``--warm-up``
seconds are left out. The report gives p50, p99 and the mean of the writes
of each configuration, and each against ``serve``, the reads' p50 and p99,
and the Synapse process's resident memory when the traffic stopped and at its
peak (``/proc``: VmRSS, VmHWM):

* ``synapse``: the module not installed (for reference);
* ``serve``: the module serving, no reclaim: the baseline;
* ``job``: the background job on with its defaults (``reclaim: enabled``),
  which starts on the whole history: the groups it reclaimed while the traffic
  ran, the groups left when it stopped, and how long the job took after that
  to leave no more than it cannot reclaim;
* ``eager``: each new group reclaimed in the transaction that persists its
  event (``reclaim: eager``): its cost per event;
* ``kill``: as ``job``, but the process killed with SIGKILL once half the
  history's groups are reclaimed (or half the traffic's time has passed, where
  the job needs longer: at Matrix HQ's scale) and restarted at once while the clients go on
  (their requests fail while it is down); after the traffic the job finishes,
  then ``verify`` compares every event's state with Synapse's (four filters):
  its mismatches and exit code. Its latencies hold the restart: they are
  reported, not compared.

With ``--breakdown``, Synapse logs every request's resource line and every
transaction's time, and the report adds, per configuration, where the time
went: per request kind, the wall and CPU time, the time waiting for a database
connection and in transactions; per transaction description, how many ran and
how long they took.

Exit code 0 when every send of the compared configurations succeeded and
``verify`` found no mismatch.
"""

import argparse
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

import attr
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.mix import resident_memory
from benchmarks.run import REPO, SCALES, ensure_dataset, prepare_postgres
from synapse_nidstate.commands.homeserver import run_in_reactor
from synapse_nidstate.demo.inprocess import homeserver_config, postgres_database
from synapse_nidstate.demo.listen import free_port

#: name -> the module's configuration (None: Synapse alone).
CONFIGS: dict[str, dict[str, Any] | None] = {
    "synapse": None,
    "serve": {"mode": "serve"},
    "job": {"mode": "serve", "reclaim": {"enabled": True}},
    "eager": {"mode": "serve", "reclaim": {"eager": True}},
    "kill": {"mode": "serve", "reclaim": {"enabled": True}},
}
#: Request kinds that read (the rest persist an event).
READS = ("context", "messages")
BIG_ROOM_SENDERS = 6
SMALL_ROOMS = 4
START_TIMEOUT = 300.0
PASSWORD = "live-benchmark"
LOG_CONFIG = """\
version: 1
formatters:
  precise: {format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'}
handlers:
  file: {class: logging.FileHandler, filename: LOGFILE, formatter: precise}
root: {level: WARNING, handlers: [file]}
disable_existing_loggers: false
"""
#: With --breakdown: every request's resource line and every transaction's time.
BREAKDOWN_LOGGERS = """\
loggers:
  synapse.access: {level: INFO}
  synapse.storage.txn: {level: DEBUG}
"""
#: Synapse's request log line (synapse/http/site.py) and transaction log line
#: (synapse/storage/database.py), as --breakdown reads them.
ACCESS_LINE = re.compile(
    r"^(?P<at>\S+ \S+) - synapse\.access.* Processed request: (?P<total>[\d.]+)sec/[\d.]+sec "
    r"ru=\((?P<utime>[\d.]+)sec, (?P<stime>[\d.]+)sec\) "
    r"db=\((?P<sched>[\d.]+)sec/(?P<txn>[\d.]+)sec/(?P<txns>\d+)\) .*"
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" .*\[(?P<evts>\d+) dbevts\]'
)
TXN_LINE = re.compile(r"^(?P<at>\S+ \S+) - synapse\.storage\.txn .*\[TXN END\] \{(?P<name>.+)-[0-9a-f]+\} "
                      r"(?P<seconds>[\d.]+) sec")
REQUEST_KINDS = (("/send/", "message"), ("/join", "join"), ("/leave", "leave"),
                 ("/context/", "context"), ("/messages", "messages"))


@attr.s(auto_attribs=True)
class Record:
    kind: str
    #: seconds since the traffic started
    at: float
    seconds: float
    status: int


class Server:
    """One ``python -m synapse.app.homeserver`` process on a run's config."""

    def __init__(self, config_path: str, port: int, log_path: str) -> None:
        self.config_path, self.port, self.log_path = config_path, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait for ``/versions``; the seconds it took."""
        started = time.monotonic()
        with open(self.log_path + ".stdout", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", self.config_path],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=os.path.dirname(self.config_path),
            )
        while time.monotonic() - started < START_TIMEOUT:
            if self.proc.poll() is not None:
                raise SystemExit(f"Synapse exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = request(self.port, "GET", "/_matrix/client/versions")
                if status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"Synapse did not answer within {START_TIMEOUT:.0f} s; see {self.log_path}")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def request(
    port: int, method: str, path: str, token: str | None = None, body: Any = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, Any]:
    """(status, decoded body); on a connection of the caller's, kept alive."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        if own:
            conn.close()


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def admin_token(port: int, secret: str) -> str:
    """An admin registered through Synapse's shared-secret registration API."""
    _, answer = request(port, "GET", "/_synapse/admin/v1/register")
    nonce, user = answer["nonce"], "live-admin"
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), user.encode(), PASSWORD.encode(), b"admin"]))
    status, answer = request(port, "POST", "/_synapse/admin/v1/register", body={
        "nonce": nonce, "username": user, "password": PASSWORD, "admin": True,
        "mac": mac.hexdigest(),
    })
    if status != 200:
        raise SystemExit(f"registering the admin: {status} {answer}")
    return str(answer["access_token"])


def user_token(port: int, admin: str, user_id: str) -> str:
    """A token for an existing user (the history's users have no password)."""
    status, answer = request(
        port, "POST", f"/_synapse/admin/v1/users/{q(user_id)}/login", admin, {}
    )
    if status != 200:
        raise SystemExit(f"logging in as {user_id}: {status} {answer}")
    return str(answer["access_token"])


@attr.s(auto_attribs=True)
class Cast:
    """Who sends what: from the database as the run starts."""

    big_room: str
    #: (user, room) of each message sender
    senders: list[tuple[str, str]]
    #: (user, room, joined now) of each user who leaves and joins a room in turn
    churn: list[tuple[str, str, bool]]
    #: messages of the big room's history that readers open (``/context``)
    history: list[str]


def cast(dsn: str, writer_state: dict[str, Any]) -> Cast:
    import psycopg2

    rooms, owner = writer_state["rooms"], writer_state["users"][0]
    big, small = rooms[0], rooms[1 : 1 + SMALL_ROOMS]
    # Only the writer's users: an admin can log in as them (the members of a
    # history written by scripts/hq_scale.py are mostly another server's).
    ours = set(writer_state["users"][1:])
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            def joined(room: str) -> list[str]:
                cur.execute(
                    "SELECT state_key FROM current_state_events WHERE room_id = %s"
                    " AND type = 'm.room.member' AND membership = 'join' AND state_key <> %s"
                    " ORDER BY state_key",
                    (room, owner),
                )
                return [row[0] for row in cur.fetchall() if row[0] in ours]

            in_big = joined(big)
            senders = [(user, big) for user in in_big[:BIG_ROOM_SENDERS]]
            senders += [(joined(room)[0], room) for room in small]
            # Two users in the big room (who are not in it, else members who do
            # not send), one in each small room.
            outside = sorted(set(writer_state["users"][1:]) - set(in_big))
            churn = [(user, big, False) for user in outside[:2]]
            churn += [(user, big, True) for user in in_big[BIG_ROOM_SENDERS:][: 2 - len(churn)]]
            for room in small:
                members = set(joined(room))
                user = next(u for u in writer_state["users"][1:] if u not in members)
                churn.append((user, room, False))
            cur.execute("SELECT setseed(0.5)")
            cur.execute(
                "SELECT event_id FROM events WHERE room_id = %s AND type = 'm.room.message'"
                " ORDER BY random() LIMIT 5000",
                (big,),
            )
            history = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    return Cast(big, senders, churn, history)


def copy_database(admin_dsn: str, template: str, name: str) -> str:
    """A fresh copy of ``template`` named ``name``; its DSN."""
    import psycopg2

    conn = psycopg2.connect(admin_dsn, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (template,),
            )
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        conn.close()
    base = {k: v for k, v in psycopg2.extensions.parse_dsn(admin_dsn).items() if k != "dbname"}
    return " ".join(f"{k}={v}" for k, v in base.items()) + f" dbname={name}"


def database_exists(admin_dsn: str, name: str) -> bool:
    import psycopg2

    conn = psycopg2.connect(admin_dsn, dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def group_counts(dsn: str) -> tuple[int, int]:
    """(state groups, groups reclaimed)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM state_groups")
            groups = cur.fetchone()[0]
            cur.execute("SELECT to_regclass('nidstate_reclaimed_groups') IS NOT NULL")
            reclaimed = 0
            if cur.fetchone()[0]:
                cur.execute("SELECT COUNT(*) FROM nidstate_reclaimed_groups")
                reclaimed = cur.fetchone()[0]
    finally:
        conn.close()
    return int(groups), int(reclaimed)


def cli(config_path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synapse_nidstate.cli", *args, "-c", config_path],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )


class Traffic:
    """The clients: one thread per sender, one for the state changes."""

    def __init__(self, port: int, tokens: dict[str, str], who: Cast, args: argparse.Namespace) -> None:
        self.port, self.tokens, self.who, self.args = port, tokens, who, args
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self.start = 0.0

    def _loop(self, token: str, period: float, offset: float, act: Callable[[int], tuple]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        i = 0
        while True:
            due = self.start + offset + i * period
            if due >= self.start + self.args.seconds:
                break
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            kind, method, path, body = act(i)
            began = time.perf_counter()
            try:
                status, _ = request(self.port, method, path, token, body, conn)
            except (OSError, http.client.HTTPException):
                status = -1  # the server is down (kill) or went away
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            with self._lock:
                self.records.append(Record(kind, began - self.start, time.perf_counter() - began, status))
            i += 1
        conn.close()

    def run(self) -> None:
        who, args, run_id = self.who, self.args, f"{time.time_ns()}"
        threads = []
        period = len(who.senders) / args.rate

        def message(user: str, room: str) -> Callable[[int], tuple]:
            return lambda i: (
                "message", "PUT",
                f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/{run_id}-{q(user)}-{i}",
                {"msgtype": "m.text", "body": f"live {i}"},
            )

        for k, (user, room) in enumerate(who.senders):
            threads.append((self.tokens[user], period, k * period / len(who.senders), message(user, room)))
        if args.state_rate > 0:
            # Users join a room and leave it again (the history's power levels
            # leave no one sure to be allowed a topic; anyone may join a public room).
            period = len(who.churn) / args.state_rate
            for k, (user, room, joined) in enumerate(who.churn):
                def churn(i: int, room: str = room, joined: bool = joined) -> tuple:
                    action = "leave" if (i % 2 == 0) == joined else "join"
                    return (action, "POST", f"/_matrix/client/v3/rooms/{q(room)}/{action}", {})

                threads.append((self.tokens[user], period, (k + 0.5) * period / len(who.churn), churn))
        if args.read_rate > 0 and who.history:
            # Readers in the big room: a permalink into its history (/context,
            # lazy-loaded members: the state at a past event) and its latest page.
            lazy = q(json.dumps({"lazy_load_members": True}))
            reader = self.tokens[who.senders[0][0]]
            threads.append((reader, 1 / args.read_rate, 0.1, lambda i: (
                "context", "GET",
                f"/_matrix/client/v3/rooms/{q(who.big_room)}/context/"
                f"{q(who.history[i // 2 % len(who.history)])}?limit=10&filter={lazy}", None,
            ) if i % 2 == 0 else (
                "messages", "GET",
                f"/_matrix/client/v3/rooms/{q(who.big_room)}/messages?dir=b&limit=100&filter={lazy}",
                None,
            )))
        self.start = time.perf_counter() + 0.5
        running = [threading.Thread(target=self._loop, args=spec, daemon=True) for spec in threads]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()


def percentile(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def summarise(records: list[Record], warm_up: float) -> dict[str, Any]:
    kept = [r for r in records if r.at >= warm_up]
    ok = [r for r in kept if r.status == 200]
    out: dict[str, Any] = {
        "requests": len(kept), "failed": len(kept) - len(ok),
        "failed_statuses": sorted({r.status for r in kept if r.status != 200}),
    }
    writes = [r for r in ok if r.kind not in READS]
    for name, chosen in (("writes", writes), ("message", [r for r in ok if r.kind == "message"]),
                         ("state", [r for r in writes if r.kind != "message"]),
                         ("reads", [r for r in ok if r.kind in READS])):
        ms = [r.seconds * 1000 for r in chosen]
        out[name] = {
            "n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else 0.0,
        }
    return out


def breakdown(log_path: str, since: float, until: float) -> dict[str, Any]:
    """Where the time of the requests and transactions logged in ``[since, until)`` went.

    Per request kind, the means of Synapse's own accounting for the request's
    log context (its request log line): wall time, CPU (user + system), time
    waiting for a database connection, time in transactions and how many. The
    persistence of an event runs in Synapse's persist queue, a background
    process of its own, so its transactions are counted under ``transactions``
    (per description: how many, the total, the mean and p99), not under the
    request that waited for it.
    """
    def wall(stamp: str) -> float:
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    requests: dict[str, list[tuple[float, ...]]] = {}
    transactions: dict[str, list[float]] = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            if "Processed request" in line:
                m = ACCESS_LINE.match(line)
                kind = m and next((k for part, k in REQUEST_KINDS if part in m["uri"]), None)
                if m and kind and since <= wall(m["at"]) < until:
                    requests.setdefault(kind, []).append((
                        float(m["total"]), float(m["utime"]) + float(m["stime"]),
                        float(m["sched"]), float(m["txn"]), float(m["txns"]), float(m["evts"]),
                    ))
            elif "[TXN END]" in line:
                m = TXN_LINE.match(line)
                if m and since <= wall(m["at"]) < until:
                    transactions.setdefault(m["name"], []).append(float(m["seconds"]))
    fields = ("wall_ms", "cpu_ms", "db_wait_ms", "db_txn_ms", "txns", "event_fetches")
    return {
        "requests": {
            kind: {"n": len(rows), **{
                field: statistics.fmean(row[i] for row in rows) * (1000 if field.endswith("_ms") else 1)
                for i, field in enumerate(fields)
            }}
            for kind, rows in sorted(requests.items())
        },
        "transactions": {
            name: {"n": len(times), "total_s": sum(times), "mean_ms": statistics.fmean(times) * 1000,
                   "p99_ms": percentile([t * 1000 for t in times], 99)}
            for name, times in sorted(transactions.items(), key=lambda kv: -sum(kv[1]))
        },
    }


#: What --breakdown reads from the metrics listener, before and after the
#: traffic (the differences are reported): the process's CPU, and the
#: module's own timers (``runtime/metrics.py``).
SCRAPED = ("process_cpu_seconds_total", "synapse_nidstate_")


def scrape(port: int) -> dict[str, float]:
    """The samples of ``SCRAPED`` families, summed over their labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_synapse/metrics", timeout=60) as answer:
        text = answer.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(SCRAPED) and not sample.name.endswith(("_bucket", "_created")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def breakdown_report(results: list[dict[str, Any]], top: int = 12) -> list[str]:
    """The breakdowns of the configurations side by side."""
    runs = [r for r in results if r.get("breakdown")]
    if not runs:
        return []
    names = [r["config"] for r in runs]
    lines = ["", "Per request (means of Synapse's request log: wall, CPU, waiting for a "
             "connection, in transactions, transactions):",
             "| request | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    kinds = sorted({k for r in runs for k in r["breakdown"]["requests"]})
    for kind in kinds:
        cells = []
        for r in runs:
            b = r["breakdown"]["requests"].get(kind)
            cells.append(f"{b['wall_ms']:.1f} / cpu {b['cpu_ms']:.1f} / wait {b['db_wait_ms']:.1f} "
                         f"/ db {b['db_txn_ms']:.1f} / {b['txns']:.1f} txns (n {b['n']})"
                         if b else "")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"Transactions, the {top} longest in total of any configuration "
              "(count, total s, mean ms, p99 ms):",
              "| transaction | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    ranked: dict[str, float] = {}
    for r in runs:
        for name, t in r["breakdown"]["transactions"].items():
            ranked[name] = max(ranked.get(name, 0.0), t["total_s"])
    for name in sorted(ranked, key=lambda n: -ranked[n])[:top]:
        cells = []
        for r in runs:
            t = r["breakdown"]["transactions"].get(name)
            cells.append(f"{t['n']} / {t['total_s']:.2f} / {t['mean_ms']:.2f} / {t['p99_ms']:.1f}"
                         if t else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The process's CPU and the module's timers during the traffic "
              "(seconds in all, count; from the metrics listener):",
              "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    metrics = [r["breakdown"].get("metrics", {}) for r in runs]
    for name in sorted({n for m in metrics for n in m if not n.endswith("_count")}):
        family = name[: -len("_sum")] if name.endswith("_sum") else name
        cells = [(f"{m[name]:.2f}" + (f" ({m[family + '_count']:.0f})" if family + "_count" in m else ""))
                 if name in m else "" for m in metrics]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


def run_config(
    name: str, module: dict[str, Any] | None, args: argparse.Namespace, template: str,
    writer_state: dict[str, Any],
) -> dict[str, Any]:
    run_dir = os.path.join(args.data, "live", name)
    os.makedirs(run_dir, exist_ok=True)
    dsn = copy_database(args.postgres, template, f"{template}_live")
    port = free_port()
    config = homeserver_config(run_dir, postgres_database(dsn), module or {"mode": "serve"})
    config.update(args.overrides)
    log_path = os.path.join(run_dir, "homeserver.log")
    with open(os.path.join(run_dir, "log.yaml"), "w") as f:
        f.write(LOG_CONFIG.replace("LOGFILE", log_path) + (BREAKDOWN_LOGGERS if args.breakdown else ""))
    metrics_port = free_port() if args.breakdown else None
    config.update({
        "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"], "type": "http",
                       "tls": False, "resources": [{"names": ["client"], "compress": False}]}]
        + ([{"port": metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"}]
           if metrics_port else []),
        "enable_metrics": bool(metrics_port),
        "log_config": os.path.join(run_dir, "log.yaml"),
        "pid_file": os.path.join(run_dir, "homeserver.pid"),
        "rc_registration": {"per_second": 1000, "burst_count": 1000},
        "rc_login": {key: {"per_second": 1000, "burst_count": 1000}
                     for key in ("address", "account", "failed_attempts")},
    })
    config_path = os.path.join(run_dir, "homeserver.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    result: dict[str, Any] = {"config": name, "module": module}
    dropped = cli(config_path, "drop", "--yes")
    if dropped.returncode != 0:
        raise SystemExit(f"drop: {dropped.stdout}{dropped.stderr}")
    if module is None:
        config["modules"] = []
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f)
    else:
        started = time.monotonic()
        migrated = cli(config_path, "migrate", "--no-progress")
        if migrated.returncode != 0:
            raise SystemExit(f"migrate: {migrated.stdout}{migrated.stderr}")
        result["migrate_seconds"] = time.monotonic() - started
    history_groups, _ = group_counts(dsn)
    result["history_groups"] = history_groups
    server = Server(config_path, port, log_path)
    result["start_seconds"] = server.start()
    try:
        admin = admin_token(port, config["registration_shared_secret"])
        who = cast(dsn, writer_state)
        users = {u for u, _ in who.senders} | {u for u, _, _ in who.churn}
        tokens = {user: user_token(port, admin, user) for user in sorted(users)}
        traffic = Traffic(port, tokens, who, args)
        timeline: list[tuple[float, int, int]] = []
        stop = threading.Event()
        killed: dict[str, float] = {}

        def watch() -> None:
            while not stop.wait(2.0):
                groups, reclaimed = group_counts(dsn)
                timeline.append((time.perf_counter() - traffic.start, groups, reclaimed))
                elapsed = time.perf_counter() - traffic.start
                if name == "kill" and not killed and (
                    reclaimed >= history_groups // 2
                    or (traffic.start > 0 and elapsed >= args.seconds / 2)
                ):
                    killed["at"] = elapsed
                    server.kill()
                    killed["restart_seconds"] = server.start()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wall_start = time.time()
        before = scrape(metrics_port) if metrics_port else {}
        traffic.run()
        if metrics_port:
            result["breakdown"] = breakdown(log_path, wall_start + args.warm_up, time.time())
            if not killed:  # a restarted process counts from zero again
                after = scrape(metrics_port)
                result["breakdown"]["metrics"] = {
                    name: after[name] - before.get(name, 0.0) for name in sorted(after)
                }
        groups, reclaimed = group_counts(dsn)
        result["traffic"] = summarise(traffic.records, args.warm_up)
        result["rss_mib"] = process_memory(server)
        result["groups_at_end"], result["reclaimed_at_end"] = groups, reclaimed
        result["left_at_end"] = groups - reclaimed
        if module and (module.get("reclaim", {}).get("enabled")):
            # The job after the traffic: until what it leaves stops changing.
            waited, last, same = 0.0, groups - reclaimed, 0
            while waited < args.catch_up and same < 3:
                time.sleep(2.0)
                waited += 2.0
                groups, reclaimed = group_counts(dsn)
                same = same + 1 if groups - reclaimed == last else 0
                last = groups - reclaimed
            result["left_after_catch_up"] = last
            result["catch_up_seconds"] = max(0.0, waited - 6.0) if same >= 3 else waited
        stop.set()
        watcher.join()
        result["timeline"] = timeline
        result["killed"] = killed or None
        if module and module.get("reclaim", {}).get("enabled"):
            # The writes while the job was still on the history (its busiest time).
            done_at = next((at for at, _, reclaimed in timeline
                            if reclaimed >= history_groups - 2), args.seconds)
            result["history_reclaimed_at"] = done_at
            result["traffic_while_reclaiming_history"] = summarise(
                [r for r in traffic.records if r.at < done_at], args.warm_up
            )
    finally:
        server.stop()
    if name == "kill":
        started = time.monotonic()
        sample = ("--sample", str(args.verify_sample)) if args.verify_sample else ()
        verified = cli(config_path, "verify", "--no-progress", *sample)
        result["verify"] = {
            "exit_code": verified.returncode, "seconds": time.monotonic() - started,
            "output": verified.stdout.strip()[-800:],
        }
    return result


def process_memory(server: Server) -> dict[str, float]:
    """The Synapse process's resident memory now and at its peak, MiB."""
    assert server.proc is not None
    return {key: value / 2**20 for key, value in resident_memory(server.proc.pid).items()}


def report(results: list[dict[str, Any]], command: str) -> str:
    base = next((r for r in results if r["config"] == "serve"), None)
    lines = [f"$ {command}",
             "| configuration | requests (failed) | p50 ms | p99 ms | mean ms | p99 vs serve "
             "| message p99 ms | state p99 ms | reads p50 / p99 ms | RSS MiB at end (peak) "
             "| groups reclaimed while sending | left at end | left after catch-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["traffic"]
        versus = (f"{t['writes']['p99_ms'] / base['traffic']['writes']['p99_ms']:.2f}"
                  if base and r["config"] != "kill" else "")
        catch = (f"{r['left_after_catch_up']:,} ({r['catch_up_seconds']:.0f} s)"
                 if "left_after_catch_up" in r else "")
        lines.append(
            f"| {r['config']} | {t['requests']:,} ({t['failed']}) | {t['writes']['p50_ms']:.1f} "
            f"| {t['writes']['p99_ms']:.1f} | {t['writes']['mean_ms']:.1f} | {versus} "
            f"| {t['message']['p99_ms']:.1f} | {t['state']['p99_ms']:.1f} "
            f"| {t['reads']['p50_ms']:.1f} / {t['reads']['p99_ms']:.1f} "
            f"| {r['rss_mib'].get('now', 0):,.0f} ({r['rss_mib'].get('peak', 0):,.0f}) "
            f"| {r['reclaimed_at_end']:,} of {r['history_groups']:,} | {r['left_at_end']:,} | {catch} |"
        )
    for r in results:
        if "history_reclaimed_at" in r:
            w = r["traffic_while_reclaiming_history"]["writes"]
            lines.append(
                f"{r['config']}: the history's groups reclaimed {r['history_reclaimed_at']:.0f} s "
                f"into the traffic; writes until then: p50 {w['p50_ms']:.1f} ms, p99 "
                f"{w['p99_ms']:.1f} ms ({w['n']} writes)"
            )
        if r.get("killed"):
            k = r["killed"]
            lines.append(f"{r['config']}: killed with SIGKILL at {k['at']:.1f} s, answering again "
                         f"{k['restart_seconds']:.1f} s later")
        if r.get("verify"):
            v = r["verify"]
            lines.append(f"{r['config']}: verify exit code {v['exit_code']} in {v['seconds']:.0f} s:"
                         f"\n    " + v["output"].replace("\n", "\n    "))
    return "\n".join(lines + breakdown_report(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="M")
    parser.add_argument("--postgres", metavar="DSN", default="host=127.0.0.1 port=5432 user=postgres")
    parser.add_argument("--database-name", metavar="NAME")
    parser.add_argument("--data", metavar="DIR")
    parser.add_argument("--seconds", type=float, default=90.0, help="traffic per configuration")
    parser.add_argument("--warm-up", type=float, default=5.0, help="seconds of traffic left out")
    parser.add_argument("--rate", type=float, default=8.0, help="messages a second, in all")
    parser.add_argument("--state-rate", type=float, default=2.0, help="state changes a second")
    parser.add_argument("--read-rate", type=float, default=2.0,
                        help="reads a second in the big room (/context, /messages)")
    parser.add_argument("--catch-up", type=float, default=120.0,
                        help="seconds the job may take after the traffic")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"which of {', '.join(CONFIGS)}, in order")
    parser.add_argument("--breakdown", action="store_true",
                        help="log every request's and transaction's time and report where it went")
    parser.add_argument("--dataset", metavar="DIR",
                        help="a history scripts/hq_scale.py --write-only wrote (its --data-dir), "
                        "instead of the runner's dataset of --scale")
    parser.add_argument("--verify-sample", type=int, metavar="N",
                        help="kill: verify N events chosen at random, not every event")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    args.engine, args.rebuild, args.port_from, args.progress = "postgres", False, None, False
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if args.dataset:
        args.data = os.path.abspath(args.dataset)
        try:
            with open(os.path.join(args.data, "dataset.json")) as f:
                saved = json.load(f)
            template, writer_state = saved["database"], saved["writer"]
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--dataset: no dataset.json of scripts/hq_scale.py in {args.data} ({e})")
        # What Synapse must be configured with on that history (every configuration alike).
        args.overrides = saved.get("homeserver_overrides", {})
        if not database_exists(args.postgres, template):
            parser.error(f"--dataset: its database {template} does not exist")
    else:
        args.data = os.path.abspath(
            args.data or os.path.join(REPO, "benchmarks", "data", f"postgres-{args.scale}")
        )
        scale = SCALES[args.scale]
        meta = {"scale": args.scale, "engine": "postgres", "shape": attr.asdict(scale.shape)}
        run_in_reactor(lambda: ensure_dataset(args, scale, meta), "nidstate-benchmark-live")
        template = args.database_name or f"nidstate_bench_{args.scale.lower()}"
        with open(os.path.join(args.data, "dataset.json")) as f:
            writer_state = json.load(f)["writer"]
        args.overrides = {}
        prepare_postgres(args.postgres, template, fresh=False)
    command = "python -m benchmarks.live " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for name in names:
        print(f"{name}: running", flush=True)
        results.append(run_config(name, CONFIGS[name], args, template, writer_state))
        print(report(results[-1:], name), flush=True)
    print(report(results, command))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "results": results}, f, indent=2)
    compared_failed = sum(r["traffic"]["failed"] for r in results if r["config"] != "kill")
    verified = all(r["verify"]["exit_code"] == 0 for r in results if "verify" in r)
    return 0 if compared_failed == 0 and verified else 1


if __name__ == "__main__":
    sys.exit(main())
