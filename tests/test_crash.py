"""kill -9 of a real Synapse process in the middle of a burst of sends.

Synapse writes an event and the mirror writes its row and snapshot in one
transaction, so a process killed at any instant leaves both or neither. After
the restart every event Synapse has (with a state group) has its snapshot,
``synapse-nidstate verify`` finds no mismatch and no orphan, and the server
keeps mirroring new events.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from twisted.trial import unittest

from tests.harness import temporary_directory
from tests.test_e2e import USERS, HttpError, SynapseProcess, q

BURST_THREADS = 4


class CrashTest(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.data_dir = temporary_directory(self, "nidstate-crash-")

    def start(self) -> SynapseProcess:
        server = SynapseProcess(self.data_dir, "serve")
        self.addCleanup(server.stop)
        server.start()
        return server

    def login(self, server: SynapseProcess, user: str) -> str:
        from tests.test_e2e import PASSWORD

        return server.ok(
            "POST", "/_matrix/client/v3/login", body={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user},
                "password": PASSWORD,
            },
        )["access_token"]

    def missing_snapshots(self) -> int:
        conn = sqlite3.connect(os.path.join(self.data_dir, "homeserver.db"))
        try:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM event_to_state_groups AS esg"
                " LEFT JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
                " WHERE g.state_group IS NULL"
            ).fetchone()
            return count
        finally:
            conn.close()

    def verify(self, server: SynapseProcess) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "synapse_nidstate.cli", "verify", "-c", server.config_path,
             "--no-progress"],
            cwd=self.data_dir, env=server.env(), capture_output=True, text=True, timeout=120,
        )

    def test_kill_9_during_a_burst_of_sends(self) -> None:
        server = self.start()
        for user in USERS:
            server.register(user)
        tokens = {user: self.login(server, user) for user in USERS}
        rooms = []
        for user in USERS:
            rooms.append(
                server.ok("POST", "/_matrix/client/v3/createRoom", tokens[user],
                          {"preset": "public_chat"})["room_id"]
            )
        for room_id in rooms:
            for user in USERS:
                server.request("POST", f"/_matrix/client/v3/rooms/{q(room_id)}/join",
                               tokens[user], {})

        # A burst: threads send messages and state changes until the process dies.
        sent: list[str] = []
        stop = threading.Event()

        def burst(index: int) -> None:
            user = USERS[index % len(USERS)]
            room_id = rooms[index % len(rooms)]
            path = f"/_matrix/client/v3/rooms/{q(room_id)}"
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if n % 5 == 0:
                        answer = server.ok("PUT", f"{path}/state/m.room.topic/",
                                           tokens[USERS[0]], {"topic": f"{index}-{n}"})
                    else:
                        answer = server.ok("PUT", f"{path}/send/m.room.message/c{index}-{n}",
                                           tokens[user], {"msgtype": "m.text", "body": str(n)})
                    sent.append(answer["event_id"])
                except (HttpError, OSError):
                    return  # the process is gone

        threads = [threading.Thread(target=burst, args=(i,)) for i in range(BURST_THREADS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(sent) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        server.proc.wait()
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        self.assertGreaterEqual(len(sent), 60, server.log_tail())

        # Whatever Synapse committed, the mirror committed with it.
        self.assertEqual(self.missing_snapshots(), 0)
        result = self.verify(server)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("mismatches: 0", result.stdout)
        self.assertIn("orphans: 0 state groups", result.stdout)

        # Restarted, it mirrors and answers from the mirror as before.
        server.start()
        rooms_path = f"/_matrix/client/v3/rooms/{q(rooms[0])}"
        after = server.ok("PUT", f"{rooms_path}/send/m.room.message/after", tokens[USERS[0]],
                          {"msgtype": "m.text", "body": "after the crash"})["event_id"]
        context = server.ok("GET", f"{rooms_path}/context/{q(after)}?limit=3", tokens[USERS[1]])
        self.assertTrue(context["state"])
        self.assertGreater(server.lookup_counts().get("served", 0), 0)
        server.stop()
        self.assertEqual(self.missing_snapshots(), 0)
        result = self.verify(server)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("mismatches: 0", result.stdout)
