"""What the module relies on in Synapse's private code, checked at start-up.

The version check (``config.check_synapse_version``) says which releases were
tested; this says whether *this* Synapse has what the module wraps, replaces,
calls or reads, in the shape the module relies on. A release that moved one of
them stops Synapse at start-up with a ``ConfigError`` naming it, even with
``allow_untested_synapse: true`` (which skips only the version check).

* :data:`REQUIREMENTS`: functions, looked up on the class Synapse builds its
  stores from (before any instance exists, from ``parse_config``), each checked
  as the module uses it: *wrapped* (called through with the caller's own
  arguments; the module reads some by name), *called* (by position, in an
  order; every other parameter must have a default), *replaced* (Synapse's
  callers call the module's method instead: same parameters, order, kinds and
  defaults, and the module's keeps Synapse's tracing span).
* :data:`ATTRIBUTES`: everything else the module reads or replaces: ``attrs``
  fields (checked on the class) and attributes set on instances (checked on the
  instances the homeserver built, when the module is, before it touches them).

Each entry says why, and since which release it holds (to the newest tested,
``config.TESTED_SYNAPSE``). ``hooks.py`` says why each method is wrapped.
"""

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attr
import synapse
from synapse.config._base import ConfigError

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

#: The oldest release every entry below was checked on.
OLDEST = "1.157.0"


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Requirement:
    """A function of Synapse's the module wraps, calls or replaces."""

    owner: str  # dotted path of the class (or module)
    name: str
    #: ``use="wrapped"``: the arguments the module reads (by name); ``"called"``:
    #: the ones it passes by position, in this order; ``"replaced"``: unused.
    parameters: tuple[str, ...]
    why: str
    use: str = "wrapped"
    #: ``use="called"``: the arguments the module passes by name.
    keywords: tuple[str, ...] = ()
    #: ``use="replaced"``: dotted path of the module's method that stands in.
    replacement: str = ""
    since: str = OLDEST


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Attribute:
    """An attribute of Synapse's the module reads or replaces, not a method."""

    owner: str  # dotted path of the class
    name: str
    why: str
    #: ``"field"``: an attrs field of the class; ``"instance"``: set on the
    #: instance the homeserver built (see :data:`INSTANCES`).
    where: str
    #: What the attribute's value must have in turn (dotted: ``cache.get``).
    has: tuple[str, ...] = ()
    since: str = OLDEST


_STATE_STORE = "synapse.storage.databases.state.store.StateGroupDataStore"
_CONTROLLER = "synapse.storage.controllers.state.StateStorageController"
_LOOKUPS = "synapse_nidstate.runtime.lookups.StateLookups"

#: Every Synapse function the module wraps, replaces or calls, by who needs it.
REQUIREMENTS: tuple[Requirement, ...] = (
    # hooks.install_mirror (write side)
    Requirement(
        "synapse.storage.databases.main.events.PersistEventsStore",
        "_persist_events_and_state_updates",
        ("room_id", "events_and_contexts"),
        "wrapped: plan a batch's snapshots before Synapse's transaction",
    ),
    Requirement(
        "synapse.storage.databases.main.events.PersistEventsStore",
        "_store_event_state_mappings_txn",
        ("txn", "events_and_contexts"),
        "wrapped: write the snapshots in Synapse's transaction",
    ),
    # hooks.install_full_state_updates
    Requirement(
        "synapse.storage.databases.main.state.StateGroupWorkerStore",
        "update_state_for_partial_state_event",
        ("event", "context"),
        "wrapped: plan the full state of an un-partial-stated event",
    ),
    Requirement(
        "synapse.storage.databases.main.state.StateGroupWorkerStore",
        "_update_state_for_partial_state_event_txn",
        ("txn", "event", "context"),
        "wrapped: give it its snapshot in the same transaction",
    ),
    # hooks.install_lookups
    Requirement(
        _CONTROLLER, "get_state_ids_for_events", (),
        "replaced: state-at-event lookups (serve, shadow)",
        use="replaced", replacement=f"{_LOOKUPS}.get_state_ids_for_events",
    ),
    Requirement(
        _CONTROLLER, "get_state_for_events", (),
        "replaced: state-at-event lookups returning events",
        use="replaced", replacement=f"{_LOOKUPS}.get_state_for_events",
    ),
    # hooks.install_group_reads: wrapped, and called for the groups not served
    Requirement(
        "synapse.storage.databases.state.bg_updates.StateGroupBackgroundUpdateStore",
        "_get_state_groups_from_groups_txn",
        ("txn", "groups", "state_filter"),
        "wrapped and called: every read of a state group's state (serve, shadow); "
        "the groups the mirror does not answer go to Synapse's",
        use="called",
    ),
    Requirement(
        _STATE_STORE, "get_state_group_delta", ("state_group",),
        "wrapped and called: one edge's delta (serve, shadow); a miss of its cache "
        "is read by group_reads into that cache (ATTRIBUTES)",
        use="called",
    ),
    # hooks.install_purges
    Requirement(
        "synapse.storage.databases.main.purge_events.PurgeEventsStore", "_purge_room_txn",
        ("txn", "room_id"), "wrapped: delete a purged room's rows in the purge transaction",
    ),
    Requirement(
        _STATE_STORE, "purge_unreferenced_state_groups",
        ("room_id", "state_groups_to_sequence_numbers"),
        "wrapped: forget deleted state groups",
    ),
    Requirement(
        "synapse.storage.databases.main.cache.CacheInvalidationWorkerStore",
        "_invalidate_caches_for_room_events",
        ("room_id",),
        "wrapped: forget cached event -> snapshot on every process after a purge",
    ),
    # mirror.py (planning), group_caches.py (Synapse's caches, for what its rows answer)
    Requirement(
        _CONTROLLER, "get_state_group_delta", ("state_group",),
        "called: the delta Synapse stored for a state group", use="called",
    ),
    Requirement(
        _STATE_STORE, "_get_state_for_groups", (),
        "replaced: every read of state groups' state, with Synapse's per-group caches "
        "(group_caches: the module's stand in for them in serve); also called by the "
        "mirror's planner for a group with no predecessor",
        use="replaced", replacement="synapse_nidstate.runtime.group_caches.GroupCaches"
        "._get_state_for_groups",
    ),
    Requirement(
        _STATE_STORE, "_get_state_for_groups_using_cache", ("groups", "cache", "state_filter"),
        "called: Synapse's caches for the groups the module's caches do not hold "
        "(group_caches)", use="called",
    ),
    Requirement(
        _STATE_STORE, "_insert_into_cache", ("group_to_state_dict", "state_filter"),
        "called: Synapse's rule for filling the per-group DictionaryCaches (with what "
        "Synapse's rows answered, group_caches)",
        use="called", keywords=("cache_seq_num_members", "cache_seq_num_non_members"),
    ),
    # runtime/failsafe.py: read past the reclaim marker in schema_compat_version
    Requirement(
        "synapse.storage.prepare_database",
        "_upgrade_existing_database",
        ("cur", "current_schema_state"),
        "wrapped: give Synapse its compat version while groups are reclaimed",
    ),
    # storage/schema.py, in-memory SQLite only
    Requirement(
        "synapse.storage.engines.sqlite.Sqlite3Engine", "on_new_connection", ("db_conn",),
        "wrapped: create the module's tables on each in-memory connection",
    ),
    # runtime/block_strings.py
    Requirement(
        "synapse.module_api.ModuleApi", "run_as_background_process", ("desc", "func"),
        "called: the strings of the blocks the live mirror wrote, filled after its "
        "transaction commits", use="called",
    ),
    # config.parse_config
    Requirement(
        "synapse.config._util", "validate_config", ("json_schema", "config", "config_path"),
        "called: the module's config checked as Synapse checks its own", use="called",
    ),
)

#: Every other attribute of Synapse's the module reads or replaces.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "synapse.module_api.ModuleApi", "_hs",
        "the homeserver, whose stores' methods the module wraps (no public accessor)",
        "instance",
    ),
    *(
        Attribute(
            "synapse.events.snapshot.EventContext", name,
            "read by the mirror: the state group Synapse maps an event to "
            "(mirror.state_group_at), and the delta Synapse computed for it",
            "field",
        )
        for name in (
            "_state_group", "state_group_before_event", "state_group_deltas",
            "partial_state", "rejected",
        )
    ),
    *(
        Attribute(
            "synapse.storage.databases.state.store._GetStateGroupDelta", name,
            "what get_state_group_delta returns: read by the mirror's planner, "
            "built by group_reads",
            "field",
        )
        for name in ("prev_group", "delta_ids")
    ),
    *(
        Attribute(
            _STATE_STORE, name,
            "Synapse's per-group DictionaryCache: emptied where Synapse's own answer "
            "must be read fresh (GroupReads.native_only, StateLookups.clear_caches); "
            "its sequence is what _insert_into_cache compares; a group the mirror "
            "wrote is dropped from it in serve (GroupReads.forget_synapse_copies); "
            "looked in by group_caches only when it holds an entry (the len of its "
            "LruCache's TreeCache, which counts entries; the LruCache's own len is "
            "their size, 0 for a group with no state)",
            "instance",
            has=("invalidate", "invalidate_all", "sequence", "cache.cache.__len__"),
        )
        for name in ("_state_group_cache", "_state_group_members_cache")
    ),
    Attribute(
        _STATE_STORE, "get_state_group_delta",
        "the @cached method's cache: a miss is read by group_reads and set in it "
        "(cache.get, cache.set); a reclaimed group's answer replaces Synapse's "
        "(prefill); emptied for cold timings (invalidate_all)",
        "instance", has=("cache.get", "cache.set", "prefill", "invalidate_all"),
    ),
    Attribute(
        "synapse.storage.databases.main.DataStore", "_get_state_group_for_event",
        "Synapse's event -> state group cache, emptied for cold timings",
        "instance", has=("invalidate_all",),
    ),
    Attribute(
        _CONTROLLER, "_partial_state_events_tracker",
        "waited on as Synapse waits, before a lookup that needs full state",
        "instance", has=("await_full_state",),
    ),
    Attribute(
        _CONTROLLER, "_is_mine_id",
        "what StateFilter.must_await_full_state takes, as Synapse passes it",
        "instance", has=("__call__",),
    ),
    Attribute(
        "synapse.storage.database.DatabasePool", "_database_config",
        "in-memory SQLite only: opens the connection the module's schema is applied on",
        "instance",
    ),
    Attribute(
        "synapse.storage.database.DatabasePool", "_db_pool",
        "in-memory SQLite only: the connections the module's tables are created on",
        "instance", has=("connections",),
    ),
    Attribute(
        "synapse.storage.engines.sqlite.Sqlite3Engine", "_is_in_memory",
        "SQLite only: whether every connection is a new database (schema, failsafe)",
        "instance",
    ),
    Attribute(
        "synapse.util.caches.lrucache.LruCache", "cache",
        "the module's own LruCaches: a membership test on their dict before get "
        "(storage.base._split_cached), a microsecond a miss saved",
        "instance", has=("__contains__",),
    ),
)


def _instances(api: "ModuleApi") -> dict[str, Any]:
    """The instances ``instance`` attributes are checked on, by owner; an
    owner this homeserver has no instance of (a PostgreSQL engine) is left out."""
    from synapse.storage.engines import Sqlite3Engine
    from synapse.util.caches.lrucache import LruCache

    found: dict[str, Any] = {"synapse.module_api.ModuleApi": api}
    hs = getattr(api, "_hs", None)
    if hs is None:
        return found
    main = hs.get_datastores().main
    found.update({
        _STATE_STORE: hs.get_datastores().state,
        "synapse.storage.databases.main.DataStore": main,
        _CONTROLLER: hs.get_storage_controllers().state,
        "synapse.storage.database.DatabasePool": main.db_pool,
        "synapse.util.caches.lrucache.LruCache": LruCache(
            max_size=1, clock=hs.get_clock(), server_name=hs.hostname
        ),
    })
    if isinstance(main.db_pool.engine, Sqlite3Engine):
        found["synapse.storage.engines.sqlite.Sqlite3Engine"] = main.db_pool.engine
    return found


def _resolve(dotted: str) -> object:
    module_name, _, attribute = dotted.rpartition(".")
    module = __import__(module_name, fromlist=[attribute])
    return getattr(module, attribute)


def _function(owner: object, name: str) -> Callable:
    # A ``@cached`` method is a descriptor that refuses class access; its
    # function is ``orig``. Static and class methods unwrap to theirs.
    function = inspect.getattr_static(owner, name)
    function = getattr(function, "orig", getattr(function, "__func__", function))
    return inspect.unwrap(function)


def _spans(owner: object, name: str) -> int:
    """How many of Synapse's tracing decorators (``@trace``, ``@tag_args``: their
    wrappers' code is in ``synapse/logging/opentracing.py``) wrap ``owner.name``;
    0 for all where the ``opentracing`` package is not installed."""
    function: Any = inspect.getattr_static(owner, name)
    count = 0
    while function is not None:
        code = getattr(function, "__code__", None)
        if code is not None and code.co_filename.endswith("logging/opentracing.py"):
            count += 1
        function = getattr(function, "__wrapped__", None)
    return count


def _signature_problems(req: Requirement, owner: object, function: Callable) -> list[str]:
    parameters = list(inspect.signature(function).parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    by_name = {p.name: p for p in parameters}
    kinds = inspect.Parameter
    if req.use == "replaced":
        ours = list(inspect.signature(_function(*_split(req.replacement))).parameters.values())[1:]
        theirs = [(p.name, p.kind, p.default) for p in parameters]
        if theirs != [(p.name, p.kind, p.default) for p in ours]:
            return [f"takes ({_describe(parameters)}), the module's replacement ({_describe(ours)})"]
        if _spans(owner, req.name) != _spans(*_split(req.replacement)):
            return ["is traced otherwise than the module's replacement (@trace, @tag_args)"]
        return []
    absent = [p for p in (*req.parameters, *req.keywords) if p not in by_name]
    if absent:
        return [f"has no parameter {', '.join(absent)}"]
    if req.use == "wrapped":
        return []  # called through with the caller's arguments, read by name
    problems = []
    positional = [p for p in parameters if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if [p.name for p in positional[: len(req.parameters)]] != list(req.parameters):
        problems.append(
            f"takes ({_describe(parameters)}), not {', '.join(req.parameters)} first by position"
        )
    positional_only = [k for k in req.keywords if by_name[k].kind == kinds.POSITIONAL_ONLY]
    if positional_only:
        problems.append(f"takes {', '.join(positional_only)} by position only")
    passed = {*req.parameters, *req.keywords}
    required = [
        p.name
        for p in parameters
        if p.name not in passed
        and p.default is kinds.empty
        and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    ]
    if required:
        problems.append(f"requires {', '.join(required)}, which the module does not pass")
    return problems


def _split(dotted: str) -> tuple[object, str]:
    owner, _, name = dotted.rpartition(".")
    return _resolve(owner), name


def _describe(parameters: list[inspect.Parameter]) -> str:
    return ", ".join(str(p) for p in parameters)


def missing(
    requirements: tuple[Requirement, ...] = REQUIREMENTS,
    attributes: tuple[Attribute, ...] = ATTRIBUTES,
    resolve: Callable[[str], object] = _resolve,
) -> list[str]:
    """What this Synapse lacks of what can be checked on its classes (functions,
    attrs fields), one line per entry not met."""
    problems = []
    for req in requirements:
        where = f"{req.owner.rpartition('.')[2]}.{req.name}"
        try:
            owner = resolve(req.owner)
            function = _function(owner, req.name)
        except (ImportError, AttributeError):
            problems.append(f"{where} does not exist ({req.why}; since {req.since})")
            continue
        problems.extend(
            f"{where} {problem} ({req.why}; since {req.since})"
            for problem in _signature_problems(req, owner, function)
        )
    for attribute in attributes:
        if attribute.where != "field":
            continue
        where = f"{attribute.owner.rpartition('.')[2]}.{attribute.name}"
        try:
            fields = {f.name for f in attr.fields(resolve(attribute.owner))}  # type: ignore[arg-type]
        except (ImportError, AttributeError, attr.exceptions.NotAnAttrsClassError):
            fields = set()
        if attribute.name not in fields:
            problems.append(f"{where} is not a field ({attribute.why}; since {attribute.since})")
    return problems


def missing_on_instances(
    instances: dict[str, Any], attributes: tuple[Attribute, ...] = ATTRIBUTES
) -> list[str]:
    """What the instances the homeserver built lack (``instance`` attributes),
    one line per attribute; owners without an instance here are not checked."""
    problems = []
    for attribute in attributes:
        if attribute.where != "instance" or attribute.owner not in instances:
            continue
        where = f"{attribute.owner.rpartition('.')[2]}.{attribute.name}"
        value = getattr(instances[attribute.owner], attribute.name, _ABSENT)
        if value is _ABSENT:
            problems.append(f"{where} does not exist ({attribute.why}; since {attribute.since})")
            continue
        for path in attribute.has:
            part: Any = value
            for step in path.split("."):
                part = getattr(part, step, _ABSENT)
                if part is _ABSENT:
                    break
            if part is _ABSENT:
                problems.append(
                    f"{where} has no {path} ({attribute.why}; since {attribute.since})"
                )
    return problems


_ABSENT = object()


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ConfigError(
            f"synapse-nidstate cannot run on Synapse {synapse.__version__}: "
            + "; ".join(problems)
            + ". Upgrade synapse-nidstate, or remove it from homeserver.yaml "
            "(after `synapse-nidstate drop`)."
        )


def check_synapse_internals() -> None:
    """Raise ConfigError naming every function or field this Synapse does not
    have as the module relies on it (from ``parse_config``, before start-up)."""
    _refuse(missing())


def check_synapse_instances(api: "ModuleApi") -> None:
    """Raise ConfigError naming every attribute the homeserver's instances lack
    (when the module is built, before it wraps or reads anything)."""
    _refuse(missing_on_instances(_instances(api)))
