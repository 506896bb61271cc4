"""The module's configuration: parsed and checked once, at Synapse's start-up."""

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import attr
from synapse.config._base import ConfigError

#: What the module does with state-at-event lookups.
#: mirror: only writes the NID tables; every lookup is Synapse's own.
#: shadow: answers with Synapse's own lookup, also computes the NID answer for
#:   the events it can, and counts and logs every difference.
#: serve: answers from the NID tables, per event falling back to Synapse's own
#:   lookup where the mirror has no answer.
MODES = ("mirror", "shadow", "serve")

T = TypeVar("T")

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
    block_cache_size: int = 500_000
    #: Entries of each NID <-> string cache (events, types, state keys, rooms).
    string_cache_size: int = 500_000
    #: Entries of the event -> snapshot and state group -> snapshot caches.
    snapshot_cache_size: int = 100_000
    #: State entries (summed over snapshots) of the resolved-state cache: whole
    #: states as strings, what warm full-state and wildcard lookups read; a
    #: snapshot that extends a cached one weighs only its changes.
    resolved_state_cache_size: int = 500_000
    #: Start on a Synapse release outside TESTED_SYNAPSE anyway.
    allow_untested_synapse: bool = False
    background_migration: BackgroundMigrationConfig = BackgroundMigrationConfig()
    reclaim: ReclaimConfig = ReclaimConfig()


_KEYS = {field.name for field in attr.fields(NidStateConfig)}
_CACHE_KEYS = (
    "block_cache_size",
    "string_cache_size",
    "snapshot_cache_size",
    "resolved_state_cache_size",
)


def parse_config(raw: Mapping[str, Any] | None) -> NidStateConfig:
    """Check the `config:` mapping of the module's entry in homeserver.yaml.

    Raises ConfigError naming the offending key (with Synapse's
    `modules.<n>.config` prefix added by Synapse's module loader).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("synapse-nidstate's config must be a mapping")
    unknown = _unknown_keys(raw, _KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_KEYS))}",
            path=(unknown[0],),
        )
    mode = raw.get("mode", "shadow")
    if mode not in MODES:
        raise ConfigError(
            f"must be one of {', '.join(MODES)}, not {mode!r}", path=("mode",)
        )
    values: dict[str, Any] = {"mode": mode}
    for key in _CACHE_KEYS:
        if key in raw:
            value = raw[key]
            if type(value) is not int or value < 1:
                raise ConfigError(
                    f"must be a positive integer, not {value!r}", path=(key,)
                )
            values[key] = value
    if "allow_untested_synapse" in raw:
        value = raw["allow_untested_synapse"]
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {value!r}", path=("allow_untested_synapse",))
        values["allow_untested_synapse"] = value
    for section, cls in (
        ("background_migration", BackgroundMigrationConfig),
        ("reclaim", ReclaimConfig),
    ):
        if section in raw:
            values[section] = _parse_section(raw[section], section, cls)
    reclaim: ReclaimConfig = values.get("reclaim", ReclaimConfig())
    if (reclaim.enabled or reclaim.eager) and mode != "serve":
        raise ConfigError(
            f"reclaim needs mode: serve (mode is {mode!r}): Synapse must read the "
            "reclaimed groups from the NID tables",
            path=("reclaim", "enabled" if reclaim.enabled else "eager"),
        )
    return NidStateConfig(**values)


def _unknown_keys(raw: Mapping[Any, Any], known: set[str]) -> list[str]:
    """The keys of ``raw`` not in ``known``, as strings (YAML keys may be numbers:
    anything but a ConfigError would reach the operator without its reason)."""
    return sorted(str(key) for key in raw if key not in known)


def _parse_section(raw: Any, prefix: str, cls: type[T]) -> T:
    """A sub-mapping whose keys are ``cls``'s fields: true/false, positive
    integers, or (``instance``) a process name."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError("must be a mapping", path=(prefix,))
    fields = {field.name: field for field in attr.fields(cls)}  # type: ignore[arg-type]
    unknown = _unknown_keys(raw, set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}",
            path=(prefix, unknown[0]),
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = fields[key].type
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {value!r}", path=(prefix, key))
        if kind is int and (type(value) is not int or value < 1):
            raise ConfigError(f"must be a positive integer, not {value!r}", path=(prefix, key))
        if kind is str and (not isinstance(value, str) or not value):
            raise ConfigError(f"must be a process name, not {value!r}", path=(prefix, key))
        values[key] = value
    return cls(**values)


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
