"""Faults inside Synapse's persistence transaction, and bad configuration."""

import os
import subprocess
import sys

import yaml
from synapse.config._base import ConfigError
from synapse.config.homeserver import HomeServerConfig
from synapse.types.state import StateFilter
from twisted.trial import unittest

from synapse_nidstate.demo.history import Driver
from synapse_nidstate.demo.inprocess import homeserver_config, sqlite_database
from synapse_nidstate.runtime.config import TESTED_SYNAPSE, check_synapse_version, parse_config
from tests.harness import HomeserverTestCase, in_logcontext, temporary_directory
from tests.scenarios import compare_room, filters_for


class InjectedFault(Exception):
    pass


async def _count(hs, table: str, column: str, value: str) -> int:  # type: ignore[no-untyped-def]
    rows = await hs.get_datastores().main.db_pool.simple_select_list(
        table, {column: value}, (column,), desc="nidstate_test_count"
    )
    return len(rows)


class FaultTests:
    @in_logcontext
    async def test_fault_after_synapse_writes_rolls_back_both(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        module = self.module(hs)
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "private_chat")

        # Fail the transaction after Synapse wrote event_to_state_groups and the
        # mirror wrote its rows: _update_metadata_tables_txn runs after both.
        persist_store = hs.get_datastores().persist_events
        original = persist_store._update_metadata_tables_txn
        seen: list[str] = []

        def failing(txn, *, events_and_contexts, **kwargs):  # type: ignore[no-untyped-def]
            for event, _ in events_and_contexts:
                if event.type == "org.example.fault":
                    seen.append(event.event_id)
                    # The mirror's rows are there, in this transaction ...
                    txn.execute(
                        "SELECT COUNT(*) FROM nidstate_events WHERE event_id = ?",
                        (event.event_id,),
                    )
                    assert txn.fetchone()[0] == 1
                    raise InjectedFault()
            return original(txn, events_and_contexts=events_and_contexts, **kwargs)

        persist_store._update_metadata_tables_txn = failing
        with self.assertRaises(InjectedFault):
            await d.send(alice, room_id, "org.example.fault", {"n": 1}, "k")
        persist_store._update_metadata_tables_txn = original
        self.assertEqual(len(seen), 1)
        # ... and rolled back with Synapse's.
        self.assertEqual(await _count(hs, "events", "event_id", seen[0]), 0)
        self.assertEqual(await _count(hs, "nidstate_events", "event_id", seen[0]), 0)
        self.assertEqual(await _count(hs, "nidstate_event_types", "event_type", "org.example.fault"), 0)
        # No NID of the rolled-back transaction was cached: the same type and
        # state key again get fresh NIDs that exist, and the mirror stays right.
        event = await d.send(alice, room_id, "org.example.fault", {"n": 2}, "k")
        await d.message(alice, room_id, "after the fault")
        self.assertEqual(await _count(hs, "nidstate_event_types", "event_type", "org.example.fault"), 1)
        await compare_room(self, hs, room_id, filters_for(hs, [alice, alice, alice]))
        state = await hs.get_storage_controllers().state.get_state_ids_for_event(event.event_id)
        self.assertEqual(state[("org.example.fault", "k")], event.event_id)
        self.assertEqual(module.stats.mirror.write_failures, 0)

    @in_logcontext
    async def test_mirror_failure_does_not_block_synapse(self) -> None:
        hs = await self.make_homeserver({"mode": "serve"})
        module = self.module(hs)
        d = Driver(hs)
        alice = await d.register("alice")
        room_id = await d.create_room(alice, "public_chat")
        original = module.store.mirror_events_txn

        def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
            original(*args, **kwargs)
            raise ValueError("a bug in the mirror")

        module.store.mirror_events_txn = broken  # type: ignore[method-assign]
        event = await d.send(alice, room_id, "m.room.topic", {"topic": "kept"}, "")
        module.store.mirror_events_txn = original  # type: ignore[method-assign]
        self.assertEqual(module.stats.mirror.write_failures, 1)
        # Synapse persisted the event; the mirror's part was rolled back to its
        # savepoint, so the event is answered by Synapse, rightly.
        self.assertEqual(await _count(hs, "events", "event_id", event.event_id), 1)
        self.assertEqual(await _count(hs, "nidstate_events", "event_id", event.event_id), 0)
        controller = hs.get_storage_controllers().state
        fallback = module.stats.lookups.fallback
        state = await controller.get_state_ids_for_event(event.event_id)
        self.assertEqual(state[("m.room.topic", "")], event.event_id)
        self.assertEqual(module.stats.lookups.fallback, fallback + 1)
        # Later events are mirrored again (their state group's predecessor is
        # the unmirrored one: the planner reads it in full, once).
        later = await d.message(alice, room_id, "later")
        served = module.stats.lookups.served
        self.assertEqual(
            await controller.get_state_ids_for_event(later.event_id),
            (await module.lookups.native_state_ids([later.event_id], StateFilter.all()))[
                later.event_id
            ],
        )
        self.assertEqual(module.stats.lookups.served, served + 1)


class SqliteFaultTests(FaultTests, HomeserverTestCase):
    engine = "sqlite"


class PostgresFaultTests(FaultTests, HomeserverTestCase):
    engine = "postgres"


class ConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        config = parse_config({})
        self.assertEqual(config.mode, "shadow")
        self.assertEqual(parse_config(None), config)

    def test_bad_values_name_the_key(self) -> None:
        # Checked by Synapse's validate_config: a bad value's path is its key,
        # an unknown key is named in the message at the mapping's path.
        for raw, path, reason in [
            ({"mode": "fast"}, ["mode"], "'fast' is not one of"),
            ({"mode": 1}, ["mode"], "1 is not one of"),
            ({"block_cache_size": 0}, ["block_cache_size"], "minimum of 1"),
            ({"block_cache_size": "10"}, ["block_cache_size"], "not of type 'integer'"),
            ({"string_cache_size": -5}, ["string_cache_size"], "minimum of 1"),
            ({"snapshot_cache_size": 1.5}, ["snapshot_cache_size"], "not of type 'integer'"),
            ({"snapshot_cache_size": True}, ["snapshot_cache_size"], "not of type 'integer'"),
            ({"allow_untested_synapse": "yes"}, ["allow_untested_synapse"], "'boolean'"),
            ({"moed": "serve"}, [], "('moed' was unexpected)"),
            # A YAML key may be a number: still a ConfigError (anything else
            # reaches the operator without its reason).
            ({1: "serve"}, [], "(1 was unexpected)"),
            ({"background_migration": {2: True}}, ["background_migration"], "(2 was unexpected)"),
            ({"reclaim": {"instance": ""}}, ["reclaim", "instance"], "should be non-empty"),
            ({"reclaim": ["x"]}, ["reclaim"], "is not of type 'object', 'null'"),
            ({"reclaim": {"eager": True}}, ["reclaim", "eager"], "reclaim needs mode: serve"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                parse_config(raw)
            self.assertEqual(list(caught.exception.path or ()), path, raw)
            self.assertIn(reason, caught.exception.msg, raw)
        with self.assertRaises(ConfigError):
            parse_config(["serve"])  # type: ignore[arg-type]
        # An empty section is its defaults, as an absent one.
        self.assertEqual(parse_config({"reclaim": None}), parse_config({}))

    def test_synapse_start_up_stops_with_the_key(self) -> None:
        # Synapse's own config parsing, as at start-up, reports the full path.
        data_dir = temporary_directory(self, "nidstate-config-")
        config_dict = homeserver_config(data_dir, sqlite_database(data_dir), {"mode": "fast"})
        with self.assertRaises(ConfigError) as caught:
            HomeServerConfig().parse_config_dict(
                config_dict, config_dir_path=data_dir, data_dir_path=data_dir
            )
        error = caught.exception
        path = list(error.path or ())
        # Synapse wraps the module's error: the detail names the key.
        detail = error
        while detail.__cause__ is not None or getattr(detail, "e", None) is not None:
            detail = getattr(detail, "e", None) or detail.__cause__  # type: ignore[assignment]
            path += list(getattr(detail, "path", ()) or ())
        self.assertIn("mode", path)
        self.assertEqual((path[0], path[2]), ("modules", "config"))

    def test_synapse_process_prints_the_key_and_the_reason(self) -> None:
        # `python -m synapse.app.homeserver -c homeserver.yaml`, as an operator
        # runs it, on a config Synapse generated: its start-up output names the
        # key and keeps the module's reason (Synapse prints a ConfigError's causes).
        data_dir = temporary_directory(self, "nidstate-config-")
        config_path = os.path.join(data_dir, "homeserver.yaml")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}

        def synapse(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "synapse.app.homeserver", *args],
                cwd=data_dir, env=env, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=120,
            )

        generated = synapse(
            "--generate-config", "--server-name", "nidstate.config",
            "--config-path", config_path, "--report-stats=no",
        )
        self.assertEqual(generated.returncode, 0, generated.stderr)
        with open(config_path) as f:
            base = yaml.safe_load(f)
        base["suppress_key_server_warning"] = True
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
        ]:
            with open(config_path, "w") as f:
                yaml.safe_dump(
                    {
                        **base,
                        "modules": [
                            {"module": "synapse_nidstate.NidStateModule", "config": module_config}
                        ],
                    },
                    f,
                )
            result = synapse("-c", config_path)
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertIn(
                f"Error in configuration at 'modules.<item 0>.config{key}'", result.stderr
            )
            self.assertIn("Failed to parse config for module", result.stderr)
            self.assertIn(reason, result.stderr)
            self.assertNotIn("Traceback", result.stderr)

    def test_untested_synapse_release(self) -> None:
        low, high = TESTED_SYNAPSE
        check_synapse_version(".".join(map(str, low)), parse_config({}))
        with self.assertRaises(ConfigError) as caught:
            check_synapse_version(".".join(map(str, high)), parse_config({}))
        self.assertIn("allow_untested_synapse", str(caught.exception.msg))
        check_synapse_version(
            ".".join(map(str, high)), parse_config({"allow_untested_synapse": True})
        )
        with self.assertRaises(ConfigError):
            check_synapse_version("1.100.0", parse_config({}))
        with self.assertRaises(ConfigError):
            check_synapse_version("unknown", parse_config({}))
        # Synapse run from a git checkout adds the branch and commit.
        check_synapse_version(
            ".".join(map(str, low)) + " (b=main,74dd135)", parse_config({})
        )
