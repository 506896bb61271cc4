"""The start-up check of the Synapse internals the module relies on."""

import ast
from pathlib import Path
from unittest import mock

import synapse
from synapse.config._base import ConfigError
from synapse.storage.controllers.state import StateStorageController
from twisted.trial import unittest

from synapse_nidstate.runtime.compat import (
    REQUIREMENTS,
    STATE_GROUPS_STATE_USERS,
    Requirement,
    missing,
)
from synapse_nidstate.runtime.module import NidStateModule


class CompatTests(unittest.TestCase):
    def test_the_installed_synapse_has_everything(self) -> None:
        """Run on every supported release (tox -e synapse-1.157 ...): fails on the
        release that lacks or changed a method the module wraps or calls."""
        self.assertEqual(missing(), [])

    def test_every_wrapped_method_is_listed(self) -> None:
        names = {r.name for r in REQUIREMENTS}
        for wrapped in (
            "_persist_events_and_state_updates",
            "_store_event_state_mappings_txn",
            "update_state_for_partial_state_event",
            "_update_state_for_partial_state_event_txn",
            "get_state_ids_for_events",
            "get_state_for_events",
            "_purge_room_txn",
            "purge_unreferenced_state_groups",
            "_invalidate_caches_for_room_events",
            "_get_state_groups_from_groups_txn",
            "get_state_group_delta",
            "_upgrade_existing_database",
            "on_new_connection",
        ):
            self.assertIn(wrapped, names)

    def test_a_missing_method_or_parameter_is_named(self) -> None:
        problems = missing(
            (
                Requirement(
                    "synapse.storage.controllers.state.StateStorageController",
                    "no_such_method", (), "test",
                ),
                Requirement(
                    "synapse.storage.controllers.state.StateStorageController",
                    "get_state_group_delta", ("no_such_parameter",), "test",
                ),
                Requirement("synapse.no_such_module.Store", "method", (), "test"),
            )
        )
        self.assertEqual(len(problems), 3)
        self.assertIn("StateStorageController.no_such_method does not exist", problems[0])
        self.assertIn("get_state_group_delta has no parameter no_such_parameter", problems[1])
        self.assertIn("Store.method does not exist", problems[2])

    def test_synapse_refuses_to_start_even_when_untested_releases_are_allowed(self) -> None:
        async def get_state_group_delta(self, group):  # type: ignore[no-untyped-def]
            raise AssertionError("never called")

        with mock.patch.object(
            StateStorageController, "get_state_group_delta", get_state_group_delta
        ):
            with self.assertRaises(ConfigError) as raised:
                NidStateModule.parse_config({"allow_untested_synapse": True})
        message = str(raised.exception)
        self.assertIn("StateStorageController.get_state_group_delta", message)
        self.assertIn("state_group", message)
        self.assertIn(synapse.__version__, message)

    def test_every_use_of_state_groups_state_is_listed(self) -> None:
        """Run on every supported release: a place of Synapse that starts (or stops)
        naming the table fails here until compat.STATE_GROUPS_STATE_USERS says
        what the module does about it."""
        self.assertEqual(sorted(_places_naming("state_groups_state")),
                         sorted(STATE_GROUPS_STATE_USERS))

    def test_the_readme_lists_every_reader(self) -> None:
        """The README's table of readers names every place the code lists."""
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        for place in STATE_GROUPS_STATE_USERS:
            where = place.split(":", 1)[1] or "synapse_port_db"
            self.assertIn(f"`{where}`", readme, place)


def _places_naming(table: str) -> set[str]:
    """``path:Class.function`` of every scope of the installed Synapse whose code
    has a string constant naming ``table`` (SQL, or a table= argument)."""
    root = Path(synapse.__file__).parent
    found: set[str] = set()

    def visit(node: ast.AST, scope: list[str], path: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name], path)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                if table in child.value:
                    found.add(f"{path}:{'.'.join(scope)}")
            else:
                visit(child, scope, path)

    for file in root.rglob("*.py"):
        visit(ast.parse(file.read_text()), [], str(file.relative_to(root)))
    return found
