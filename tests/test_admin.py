"""End to end: the admin-only status endpoint of a real Synapse process.

One Synapse process (``python -m synapse.app.homeserver``, as in test_e2e) with
the module in mode ``serve``; an admin and a normal user registered with the
shared secret; a room with a few events; then ``GET /_synapse/nidstate/v1/status``
without a token, with a bad token, as the normal user and as the admin.
"""

import os
import shutil
import tempfile
from typing import Any

import attr
from twisted.trial import unittest

from synapse_nidstate.runtime.metrics import (
    BlockStringsStats,
    LookupStats,
    MigrationStats,
    MirrorStats,
    ReclaimStats,
)
from synapse_nidstate.runtime.status import STATUS_PATH
from tests.test_e2e import PASSWORD, SynapseProcess, q

MODE = "serve"


def login(server: SynapseProcess, localpart: str) -> str:
    return server.ok(
        "POST",
        "/_matrix/client/v3/login",
        body={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": PASSWORD,
        },
    )["access_token"]


class StatusEndpointTest(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        data_dir = tempfile.mkdtemp(prefix="nidstate-admin-")
        if not os.environ.get("NIDSTATE_E2E_KEEP"):
            self.addCleanup(shutil.rmtree, data_dir, True)
        self.server = SynapseProcess(data_dir, MODE)
        self.addCleanup(self.server.stop)
        self.server.start()

    def assertError(self, answer: tuple[int, Any], status: int, errcode: str) -> None:
        code, body = answer
        self.assertEqual(code, status, body)
        self.assertIsInstance(body, dict, body)
        self.assertEqual(body.get("errcode"), errcode, body)
        self.assertIsInstance(body.get("error"), str, body)

    def test_status_is_admin_only(self) -> None:
        server = self.server
        server.register("admin", admin=True)
        server.register("user")
        admin_token = login(server, "admin")
        user_token = login(server, "user")

        # A few events, so that the mirror has something to count.
        room_id = server.ok(
            "POST", "/_matrix/client/v3/createRoom", user_token, {"preset": "public_chat"}
        )["room_id"]
        for n in range(3):
            server.ok(
                "PUT",
                f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/admin-{n}",
                user_token,
                {"msgtype": "m.text", "body": f"message {n}"},
            )

        self.assertError(server.request("GET", STATUS_PATH), 401, "M_MISSING_TOKEN")
        self.assertError(server.request("GET", STATUS_PATH, "not-a-token"), 401, "M_UNKNOWN_TOKEN")
        self.assertError(server.request("GET", STATUS_PATH, user_token), 403, "M_FORBIDDEN")

        code, body = server.request("GET", STATUS_PATH, admin_token)
        self.assertEqual(code, 200, body)
        self.assertLessEqual(
            {"mode", "schema_version", "persists_events", "serves_group_reads", "counters",
             "migration"},
            set(body),
            body,
        )
        self.assertEqual(body["mode"], MODE)
        self.assertIsInstance(body["schema_version"], int)
        self.assertGreaterEqual(body["schema_version"], 1)
        # The main process of a single-process deployment persists every event.
        self.assertIs(body["persists_events"], True)
        # One database: Synapse's state-group reads go through the module (serve/shadow).
        self.assertIs(body["serves_group_reads"], body["mode"] != "mirror")
        counters = body["counters"]
        self.assertEqual(
            set(counters),
            {"mirror", "lookups", "group_reads", "migration", "reclaim", "block_strings"},
            counters,
        )
        for group, expected in (
            ("mirror", MirrorStats),
            ("lookups", LookupStats),
            ("group_reads", LookupStats),
            ("migration", MigrationStats),
            ("reclaim", ReclaimStats),
            ("block_strings", BlockStringsStats),
        ):
            names = {field.name for field in attr.fields(expected)}
            self.assertEqual(set(counters[group]), names, counters)
            for name, value in counters[group].items():
                self.assertIsInstance(value, int, f"{group}.{name}")
                self.assertGreaterEqual(
                    value, -1 if name == "lag_stream_positions" else 0, f"{group}.{name}"
                )
        # createRoom's events and the three messages went through the mirror.
        self.assertGreater(counters["mirror"]["events_mirrored"], 0, counters)
        self.assertEqual(counters["lookups"]["mismatched"], 0, counters)
        # Every event was persisted with the module live: nothing to migrate.
        migration = body["migration"]
        self.assertEqual(migration["remaining_events"], 0, migration)
        self.assertIs(migration["background"], False)
        # Nothing reclaimed: no job, every group with a snapshot left to reclaim.
        reclaim = body["reclaim"]
        self.assertEqual(
            set(reclaim),
            {"background", "eager", "groups_reclaimed", "rows_deleted", "groups_left", "here"},
        )
        self.assertEqual((reclaim["groups_reclaimed"], reclaim["rows_deleted"]), (0, 0))
        self.assertGreater(reclaim["groups_left"], 0)
        self.assertEqual(reclaim["here"], counters["reclaim"])
