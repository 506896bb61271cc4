"""The start-up check of the Synapse internals the module relies on."""

import ast
import inspect
import types
from pathlib import Path
from typing import Any
from unittest import mock

import attr
import synapse
from synapse.config._base import ConfigError
from synapse.storage.controllers.state import StateStorageController
from twisted.trial import unittest

from synapse_nidstate.runtime import compat
from synapse_nidstate.runtime.compat import (
    ATTRIBUTES,
    REQUIREMENTS,
    Requirement,
    _function,
    _resolve,
    missing,
    missing_on_instances,
)
from synapse_nidstate.runtime.module import NidStateModule
from synapse_nidstate.runtime.readers import STATE_GROUPS_STATE_USERS
from tests.harness import HomeserverTestCase, in_logcontext


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

    def test_each_function_renamed_in_a_copy_of_its_class_is_refused(self) -> None:
        for req in REQUIREMENTS:
            owner = _resolve(req.owner)
            copy = _copy(owner, rename=req.name)
            problems = missing((req,), (), resolve=lambda dotted, copy=copy: copy)
            where = f"{req.owner.rpartition('.')[2]}.{req.name}"
            self.assertEqual(problems, [f"{where} does not exist ({req.why}; since {req.since})"])

    def test_each_changed_signature_is_refused(self) -> None:
        kinds = inspect.Parameter
        for req in REQUIREMENTS:
            owner = _resolve(req.owner)
            function = _function(owner, req.name)
            signature = inspect.signature(function)
            parameters = list(signature.parameters.values())
            variants: dict[str, list[inspect.Parameter]] = {}
            if req.use != "replaced":
                # A parameter the module reads or passes renamed.
                renamed = req.parameters[-1] if req.parameters else req.keywords[0]
                variants[f"has no parameter {renamed}"] = [
                    p.replace(name="renamed") if p.name == renamed else p for p in parameters
                ]
            if req.use == "called":
                # A new parameter without a default, which the module would not pass.
                extra = kinds("new_required", kinds.KEYWORD_ONLY)
                variadic = [p for p in parameters if p.kind == kinds.VAR_KEYWORD]
                variants["requires new_required"] = [
                    *(p for p in parameters if p.kind != kinds.VAR_KEYWORD), extra, *variadic
                ]
                # The first parameter the module passes by position made keyword-only.
                first = req.parameters[0]
                variants["first by position"] = [
                    p for p in parameters if p.name != first and p.kind != kinds.VAR_KEYWORD
                ] + [kinds(first, kinds.KEYWORD_ONLY)]
                if req.keywords:  # what it passes by name made positional-only
                    variants["by position only"] = [
                        p.replace(kind=kinds.POSITIONAL_ONLY)
                        for p in parameters
                        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
                    ]
                if len(req.parameters) > 1:  # two the module passes by position swapped
                    a, b = (parameters.index(signature.parameters[n]) for n in req.parameters[:2])
                    swapped = list(parameters)
                    swapped[a], swapped[b] = swapped[b], swapped[a]
                    variants["first by position"] = swapped
            if req.use == "replaced":
                # A new optional parameter: Synapse's callers may pass it, and the
                # module's replacement would refuse it.
                optional = kinds("new_optional", kinds.KEYWORD_ONLY, default=None)
                variants["the module's replacement"] = [*parameters, optional]
            self.assertTrue(variants, req)
            for expected, changed in variants.items():

                def stand_in(*args: object, **kwargs: object) -> None:
                    raise AssertionError("never called")

                stand_in.__signature__ = signature.replace(parameters=changed)  # type: ignore[attr-defined]
                copy = _copy(owner, replace={req.name: stand_in})
                problems = missing((req,), (), resolve=lambda dotted, copy=copy: copy)
                self.assertEqual(len(problems), 1, (req.name, expected, problems))
                self.assertIn(f".{req.name} ", problems[0])
                self.assertIn(expected, problems[0], req.name)

    def test_a_replaced_method_keeps_synapses_tracing(self) -> None:
        # Synapse's own method, undecorated, against the module's traced one
        # (where the opentracing package is installed, as the dev extra does).
        import opentracing  # noqa: F401

        for req in (r for r in REQUIREMENTS if r.use == "replaced"):
            owner = _resolve(req.owner)
            copy = _copy(owner, replace={req.name: _function(owner, req.name)})
            problems = missing((req,), (), resolve=lambda dotted, copy=copy: copy)
            self.assertEqual(len(problems), 1, problems)
            self.assertIn("is traced otherwise", problems[0])

    def test_each_field_missing_from_a_copy_of_its_class_is_refused(self) -> None:
        for attribute in (a for a in ATTRIBUTES if a.where == "field"):
            cls = _resolve(attribute.owner)
            copy = attr.make_class(
                cls.__name__,  # type: ignore[attr-defined]
                [f.name for f in attr.fields(cls) if f.name != attribute.name],  # type: ignore[arg-type]
            )
            problems = missing((), (attribute,), resolve=lambda dotted, copy=copy: copy)
            where = f"{attribute.owner.rpartition('.')[2]}.{attribute.name}"
            self.assertEqual(len(problems), 1, problems)
            self.assertIn(f"{where} is not a field", problems[0])

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
        naming the table fails here until readers.STATE_GROUPS_STATE_USERS says
        what the module does about it."""
        self.assertEqual(sorted(_places_naming("state_groups_state")),
                         sorted(STATE_GROUPS_STATE_USERS))

    def test_the_readme_lists_every_reader(self) -> None:
        """The README's table of readers names every place the code lists."""
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        for place in STATE_GROUPS_STATE_USERS:
            where = place.split(":", 1)[1] or "synapse_port_db"
            self.assertIn(f"`{where}`", readme, place)


def _copy(owner: object, rename: str | None = None, replace: dict | None = None) -> object:
    """A copy of a class (or module) of Synapse's with one name renamed or some
    replaced: what a release that changed it would look like to the check."""
    namespace = {
        k: v for k, v in vars(owner).items() if k not in ("__dict__", "__weakref__")
    }
    if rename is not None:
        namespace[f"{rename}_renamed"] = namespace.pop(rename)
    namespace.update(replace or {})
    if isinstance(owner, type):
        return type(owner.__name__, (), namespace)
    return types.SimpleNamespace(**namespace)


class InstanceAttributeTests(HomeserverTestCase):
    """The attributes set on the instances a homeserver builds."""

    @in_logcontext
    async def test_instances_and_wrappers(self) -> None:
        # One homeserver for both checks (one started and shut down within a
        # second leaves Synapse's start-up tasks to run after its shutdown).
        hs = await self.make_homeserver({"mode": "serve"})
        self._each_attribute_missing_from_a_copy_of_its_instance_is_refused(hs)
        await self._every_wrapper_passes_through_what_it_does_not_use(hs)

    def _each_attribute_missing_from_a_copy_of_its_instance_is_refused(self, hs: Any) -> None:
        module = self.module(hs)
        instances = compat._instances(module._api)
        self.assertEqual(missing_on_instances(instances), [])
        checked = 0
        for attribute in (a for a in ATTRIBUTES if a.where == "instance"):
            if attribute.owner not in instances:
                continue  # a SQLite engine's, on PostgreSQL
            checked += 1
            where = f"{attribute.owner.rpartition('.')[2]}.{attribute.name}"
            real = instances[attribute.owner]
            # The instance without the attribute (Synapse renamed it) ...
            without = types.SimpleNamespace()
            problems = missing_on_instances({attribute.owner: without}, (attribute,))
            self.assertEqual(len(problems), 1, problems)
            self.assertIn(f"{where} does not exist", problems[0])
            # ... and with a value that lacks what the module uses of it.
            for path in attribute.has:
                value = _without(getattr(real, attribute.name), path.split("."))
                holder = types.SimpleNamespace(**{attribute.name: value})
                problems = missing_on_instances({attribute.owner: holder}, (attribute,))
                self.assertEqual(len(problems), 1, (attribute.name, path, problems))
                self.assertIn(f"{where} has no {path}", problems[0])
        self.assertGreaterEqual(checked, 10)

    async def _every_wrapper_passes_through_what_it_does_not_use(self, hs: Any) -> None:
        # A wrapper takes whatever Synapse passes and hands it all on: a
        # parameter Synapse adds reaches Synapse's method unchanged.
        stores = hs.get_datastores()
        wrapped = [
            stores.persist_events._persist_events_and_state_updates,
            stores.persist_events._store_event_state_mappings_txn,
            stores.main.update_state_for_partial_state_event,
            stores.main._update_state_for_partial_state_event_txn,
            stores.main._purge_room_txn,
            stores.main._invalidate_caches_for_room_events,
            stores.state._get_state_groups_from_groups_txn,
            stores.state.get_state_group_delta,
            stores.state.purge_unreferenced_state_groups,
        ]
        for function in wrapped:
            kinds = {
                p.kind for p in inspect.signature(function, follow_wrapped=False).parameters.values()
            }
            self.assertEqual(
                kinds,
                {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD},
                function.__qualname__,
            )
        # And one for real: an argument by keyword that the wrapper reads, and
        # one it does not know, both reach Synapse's method.
        seen: list[dict] = []
        state = stores.state

        def spy(txn: object, groups: list, state_filter: object = None, **extra: object) -> dict:
            seen.append({"groups": groups, **extra})
            return {g: {} for g in groups}

        from synapse_nidstate.runtime.hooks import install_group_reads

        state._get_state_groups_from_groups_txn = spy  # type: ignore[method-assign]
        install_group_reads(hs, self.module(hs).group_reads)
        self.module(hs).group_reads._native_depth += 1  # Synapse's answer, not the mirror's
        answer = await state.db_pool.runInteraction(
            "t",
            lambda txn: state._get_state_groups_from_groups_txn(
                txn, groups=[1, 2], added_by_synapse="x"
            ),
        )
        self.assertEqual(dict(answer), {1: {}, 2: {}})
        self.assertEqual(seen[-1], {"groups": [1, 2], "added_by_synapse": "x"})


def _without(value: object, path: list[str]) -> object:
    """A stand-in for ``value`` with every attribute but the end of ``path``."""
    if not path:
        return value
    names = [n for n in dir(value) if not n.startswith("__")]
    holder = types.SimpleNamespace(**{n: getattr(value, n) for n in names if n != path[0]})
    if len(path) > 1:
        setattr(holder, path[0], _without(getattr(value, path[0]), path[1:]))
    return holder


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
