"""End to end: what a client gets when the module's tables are corrupted.

A real Synapse process (mode serve) builds a room over HTTP; the answers to
``/context`` at every event are recorded. With one block of the tables
corrupted (a byte changed: it still decodes, to other NIDs), the restarted
server answers every request exactly as before, from Synapse's own rows, and
counts the failed reads. Once the room's state groups are reclaimed (their
rows deleted by ``synapse-nidstate reclaim``), the same corruption makes the
requests that need it fail with HTTP 500 and a message saying the state is
unavailable, never a wrong state.
"""

import os
import sqlite3
import subprocess
import sys
from typing import Any

from synapse_nidstate import algebra
from tests.test_e2e import (
    PASSWORD,
    SCRIPT_TIMEOUT,
    SERVER_NAME,
    USERS,
    ServerTestCase,
    build_room,
    q,
    replay,
)


def flip_a_byte(database: str, event_id: str, which: int = 0) -> tuple[int, bytes]:
    """Change one event NID in a block of ``event_id``'s snapshot (``which``:
    its index in the block list; the first is the base most snapshots share);
    returns the block and its bytes before."""
    with sqlite3.connect(database) as conn:
        (block_nids,) = conn.execute(
            "SELECT s.block_nids FROM event_to_state_groups AS esg"
            " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group"
            " JOIN nidstate_snapshots AS s ON s.snapshot_nid = g.snapshot_nid"
            " WHERE esg.event_id = ?",
            (event_id,),
        ).fetchone()
        block = algebra.unpack_nids(block_nids)[which]
        (entries,) = conn.execute(
            "SELECT entries FROM nidstate_blocks WHERE block_nid = ?", (block,)
        ).fetchone()
        changed = bytearray(entries)
        changed[-4] ^= 0x01
        conn.execute(
            "UPDATE nidstate_blocks SET entries = ? WHERE block_nid = ?", (bytes(changed), block)
        )
    return block, bytes(entries)


def _restore(database: str, block: int, entries: bytes) -> None:
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE nidstate_blocks SET entries = ? WHERE block_nid = ?", (entries, block))


class ReadFaultEndToEndTest(ServerTestCase):
    def test_a_corrupted_block_reaches_clients_as_synapses_answer_or_a_clear_error(
        self,
    ) -> None:
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
        rooms = f"/_matrix/client/v3/rooms/{q(room_id)}"
        page = server.ok("GET", f"{rooms}/messages?dir=b&limit=100", tokens["alice"])
        timeline = [e["event_id"] for e in reversed(page["chunk"])]
        requests: list[Any] = [
            ("context", user, f"{rooms}/context/{q(event_id)}?limit=3")
            for event_id in timeline
            for user in ("alice", "carol")
        ]
        before = replay(server, tokens, requests)
        server.stop()
        database = os.path.join(self.data_dir, "homeserver.db")

        # Corrupted, nothing reclaimed: every answer is Synapse's, unchanged.
        block, entries = flip_a_byte(database, timeline[-1])
        server = self.start("serve")
        self.assertSameAnswers(requests, before, replay(server, tokens, requests), "before", "corrupted")
        failed = server.lookup_counts()
        self.assertGreater(failed.get("failed", 0), 0, failed)
        self.assertEqual(failed.get("unavailable", 0), 0, failed)
        server.stop()

        # Repaired, reclaimed, corrupted again: the requests that need the
        # block fail loudly; none answers a wrong state.
        _restore(database, block, entries)
        reclaim = subprocess.run(
            [sys.executable, "-m", "synapse_nidstate.cli", "reclaim", "-c", server.config_path,
             "--no-progress"],
            cwd=self.data_dir, env=server.env(), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
        )
        self.assertEqual(reclaim.returncode, 0, reclaim.stdout + reclaim.stderr)
        flip_a_byte(database, timeline[-1])
        server = self.start("serve")
        after = replay(server, tokens, requests)
        status, answer = server.request("GET", requests[-1][2], tokens["alice"])
        self.assertEqual(status, 500, answer)
        self.assertEqual(answer["errcode"], "M_UNKNOWN")
        self.assertIn("unavailable on this server", answer["error"])
        self.assertIn("synapse-nidstate", answer["error"])
        for request, want, got in zip(requests, before, after, strict=True):
            if got != want:  # only ever an error, never another answer
                self.assertEqual(got, {"status": 500, "errcode": "M_UNKNOWN"}, request)
        counts = server.lookup_counts()
        self.assertGreater(counts.get("unavailable", 0), 0, counts)
        self.assertGreater(
            server.metric_value(
                "synapse_nidstate_group_reads_total", server_name=SERVER_NAME,
                outcome="unavailable",
            ),
            0,
        )
        server.stop()

