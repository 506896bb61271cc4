"""The module's configuration: parsed and checked once, at Synapse's start-up."""

import re
from collections.abc import Mapping
from typing import Any

import attr
from synapse.config._base import ConfigError
from synapse.config._util import validate_config
from synapse.types import JsonDict

#: What the module does with state-at-event lookups.
#: mirror: only writes the NID tables; every lookup is Synapse's own.
#: shadow: answers with Synapse's own lookup, also computes the NID answer for
#:   the events it can, and counts and logs every difference.
#: serve: answers from the NID tables, per event falling back to Synapse's own
#:   lookup where the mirror has no answer.
MODES = ("mirror", "shadow", "serve")

#: The Synapse releases this module was tested against (inclusive, exclusive).
TESTED_SYNAPSE = ((1, 157, 0), (1, 164, 0))


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class BackgroundMigrationConfig:
    """`background_migration:` — Synapse itself migrates history, a batch at a time."""

    enabled: bool = False
    #: Events per transaction.
    batch_size: int = 500
    #: Pause between two batches (the rate limit).
    interval_ms: int = 1000
    #: The one process that runs it (`master`, or a worker's name).
    instance: str = "master"


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class ReclaimConfig:
    """`reclaim:` — delete the rows of ``state_groups_state`` the snapshots replace
    (each group proved first, in the same transaction; ``restore`` writes them
    back). Needs mode ``serve``, and the state database to be the main one."""

    #: A background job reclaims groups as they come, a batch at a time.
    enabled: bool = False
    #: Reclaim each new group in the transaction that persists its event, so
    #: that its rows do not outlive that persistence.
    eager: bool = False
    #: State groups per transaction.
    batch_size: int = 100
    #: Pause between two batches of the background job.
    interval_ms: int = 1000
    #: The one process that runs the background job (`master`, or a worker's name).
    instance: str = "master"


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class NidStateConfig:
    mode: str = "shadow"
    #: State entries (summed over blocks) of the immutable-block cache. Sized in
    #: entries, not blocks: a compacted block of a big room holds thousands.
    block_cache_size: int = 50_000
    #: Entries of each NID <-> string cache (events, types, state keys, rooms).
    string_cache_size: int = 500_000
    #: Entries of the event -> snapshot and state group -> snapshot caches.
    snapshot_cache_size: int = 100_000
    #: Blocks listed (summed over snapshots) of the snapshot -> block list
    #: cache, which also keeps each listed block's key range once a narrow
    #: read has seen them all: what lets a read of another filter at a
    #: snapshot read lately skip its first statement and the blocks that
    #: cannot hold its keys. About 20 bytes a listed block.
    block_list_cache_size: int = 20_000
    #: State entries (summed over snapshots) of the resolved-state cache: whole
    #: states as strings, what warm full-state and wildcard lookups read; a
    #: snapshot that extends a cached one weighs only its changes.
    resolved_state_cache_size: int = 500_000
    #: Run the module's read statements as server-side prepared statements
    #: on PostgreSQL (``storage/prepared.py``); false behind a connection
    #: pooler in transaction mode, which does not keep a session's statements.
    prepared_statements: bool = True
    #: After a read that built a big room's whole state, give the memory it
    #: freed back to the system (glibc's ``malloc_trim``; runtime/freed_memory.py).
    trim_freed_memory: bool = True
    #: Start on a Synapse release outside TESTED_SYNAPSE anyway.
    allow_untested_synapse: bool = False
    background_migration: BackgroundMigrationConfig = BackgroundMigrationConfig()
    reclaim: ReclaimConfig = ReclaimConfig()


def _schema(cls: type) -> JsonDict:
    """The JSON schema of an attrs config class: its fields are its keys, each
    true/false, a positive integer, a non-empty string or a section (a mapping
    in turn, or empty for its defaults)."""
    kinds: dict[Any, JsonDict] = {
        bool: {"type": "boolean"},
        int: {"type": "integer", "minimum": 1},
        str: {"type": "string", "minLength": 1},
    }
    properties = {
        field.name: (
            {**_schema(field.type), "type": ["object", "null"]}
            if attr.has(field.type)
            else dict(kinds[field.type])
        )
        for field in attr.fields(cls)
    }
    return {"type": "object", "properties": properties, "additionalProperties": False}


#: The `config:` mapping, checked as Synapse checks its own sections
#: (``validate_config``: the error names the key path and jsonschema's reason).
SCHEMA = _schema(NidStateConfig)
SCHEMA["properties"]["mode"] = {"enum": list(MODES)}


def parse_config(raw: Mapping[str, Any] | None) -> NidStateConfig:
    """Check the `config:` mapping of the module's entry in homeserver.yaml.

    Raises ConfigError naming the offending key (with Synapse's
    `modules.<n>.config` prefix added by Synapse's module loader).
    """
    validate_config(SCHEMA, {} if raw is None else raw, ())
    values = dict(raw or {})
    for field in attr.fields(NidStateConfig):
        section: Any = field.type
        if attr.has(section) and field.name in values:
            values[field.name] = section(**(values[field.name] or {}))
    config = NidStateConfig(**values)
    reclaim = config.reclaim
    if (reclaim.enabled or reclaim.eager) and config.mode != "serve":
        raise ConfigError(
            f"reclaim needs mode: serve (mode is {config.mode!r}): Synapse must read the "
            "reclaimed groups from the NID tables",
            path=("reclaim", "enabled" if reclaim.enabled else "eager"),
        )
    return config


def check_synapse_version(version: str, config: NidStateConfig) -> None:
    """Refuse to start on a Synapse release this module was not tested with.

    Wrapping Synapse's private persistence and state methods is only safe where
    their signatures and semantics are known; `allow_untested_synapse: true`
    overrides this at the operator's risk.
    """
    # Synapse run from a git checkout says e.g. "1.163.2 (b=main,74dd135)".
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    release = tuple(int(part) for part in match.groups()) if match else ()
    low, high = TESTED_SYNAPSE
    if low <= release < high or config.allow_untested_synapse:
        return
    raise ConfigError(
        f"synapse-nidstate is tested with Synapse {'.'.join(map(str, low))} up to "
        f"(not including) {'.'.join(map(str, high))}, and this is Synapse {version}. "
        "Install a tested release, or set allow_untested_synapse: true to start anyway",
        path=("allow_untested_synapse",),
    )
