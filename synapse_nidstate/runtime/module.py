"""The Synapse module: what `modules: - module: synapse_nidstate.NidStateModule` loads."""

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attr
import synapse
from synapse.module_api import ModuleApi

from synapse_nidstate.runtime import failsafe, hooks, status
from synapse_nidstate.runtime.block_strings import BlockStringsFiller
from synapse_nidstate.runtime.compat import check_synapse_instances, check_synapse_internals
from synapse_nidstate.runtime.config import NidStateConfig, check_synapse_version, parse_config
from synapse_nidstate.runtime.faults import FaultLog
from synapse_nidstate.runtime.freed_memory import FreedMemory
from synapse_nidstate.runtime.group_reads import GroupReads
from synapse_nidstate.runtime.lookups import StateLookups
from synapse_nidstate.runtime.metrics import COLLECTOR, NidStateStats
from synapse_nidstate.runtime.migration import Migrator
from synapse_nidstate.runtime.mirror import Mirror
from synapse_nidstate.runtime.reclaim import Reclaimer
from synapse_nidstate.storage import NidStore
from synapse_nidstate.storage.schema import apply_schema

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

#: The attribute of a HomeServer that holds its module instance, for the CLI,
#: the demo and tests (Synapse keeps no reference to the modules it loads). On
#: the HomeServer itself, so the module lives and dies with it: a
#: WeakKeyDictionary would keep both alive for good (the module references
#: its HomeServer), one leaked homeserver per test of Synapse's own suite.
_ATTRIBUTE = "_synapse_nidstate_module"


def module_for(hs: "HomeServer") -> "NidStateModule | None":
    """The NidStateModule loaded into ``hs``, if any."""
    return getattr(hs, _ATTRIBUTE, None)


def _one_at_a_time(
    what: str, batch: Callable[[], Awaitable[object]]
) -> Callable[[], Awaitable[None]]:
    """A background job's step: ``batch``, skipped while the previous one runs;
    a failure is logged and the next step tries again."""
    running = False

    async def step() -> None:
        nonlocal running
        if running:
            return
        running = True
        try:
            await batch()
        except Exception:
            logger.exception("synapse-nidstate: background %s batch failed; retrying", what)
        finally:
            running = False

    return step


class NidStateModule:
    """Mirrors room state into NID tables and (mode serve) answers lookups from them.

    Built by Synapse on every process (main and workers) before its listeners
    start. The schema is brought up to date here, synchronously, so that a
    process never persists an event before the module's tables exist, and a
    failure stops Synapse at start-up.
    """

    def __init__(self, config: NidStateConfig, api: ModuleApi) -> None:
        self.config = config
        self._api = api
        check_synapse_instances(api)  # before anything of Synapse's is read or wrapped
        hs = api._hs
        self.stats = NidStateStats(hs.hostname)
        COLLECTOR.add(self.stats)

        self.schema_version = apply_schema(hs)
        self.store = NidStore(hs, config)
        self.mirror = Mirror(hs, self.store, self.stats.mirror)
        self.persists_events = hooks.install_mirror(hs, self.mirror)
        self.block_strings = BlockStringsFiller(api, self.store, self.stats.block_strings)
        self.mirror.wrote_big_blocks = self.block_strings.kick
        self.freed_memory = FreedMemory(api, hs.get_reactor())
        if config.trim_freed_memory:
            self.store.after_big_read = self.freed_memory.kick
        hooks.install_full_state_updates(hs, self.mirror)
        hooks.install_purges(hs, self.store)

        controller = hs.get_storage_controllers().state
        faults = FaultLog()  # each cause logged once, whichever read met it
        self.lookups = StateLookups(
            controller,
            self.store,
            self.stats.lookups,
            config.mode,
            native_state_ids=controller.get_state_ids_for_events,
            server_name=hs.hostname,
            faults=faults,
        )
        self.group_reads = GroupReads(
            self.store, self.stats.group_reads, config.mode, server_name=hs.hostname, faults=faults
        )
        self.serves_group_reads = False
        if config.mode != "mirror":
            hooks.install_lookups(hs, self.lookups)
            self.serves_group_reads = hooks.install_group_reads(hs, self.group_reads)
            self.lookups.group_reads = self.group_reads
            if self.serves_group_reads:
                self.mirror.written = self.group_reads.forget_synapse_copies
        self.reclaimed_at_start = failsafe.check_start_up(
            hs, config.mode, self.serves_group_reads
        )
        self.reclaimer = Reclaimer(hs, self.store, self.stats.reclaim, config.reclaim.batch_size)
        if config.reclaim.enabled or config.reclaim.eager:
            self.reclaimer.check_possible_at_start_up()
        if config.reclaim.eager:
            self.mirror.eager_reclaim = self.reclaimer.reclaim_txn
        self.reclaims_in_background = (
            config.reclaim.enabled and hs.get_instance_name() == config.reclaim.instance
        )
        if self.reclaims_in_background:
            api.looping_background_call(
                _one_at_a_time("reclaim", self.reclaimer.background_batch),
                config.reclaim.interval_ms,
                desc="nidstate_background_reclaim",
                run_on_all_instances=True,  # this one instance, chosen above
            )

        self.migrator = Migrator(
            hs,
            self.store,
            self.stats.mirror,
            config.background_migration.batch_size,
            self.stats.migration,
            self.stats.block_strings,
        )
        background = config.background_migration
        self.migrates_in_background = (
            background.enabled and hs.get_instance_name() == background.instance
        )
        if self.migrates_in_background:
            api.looping_background_call(
                _one_at_a_time("migration", self.migrator.run_batch),
                background.interval_ms,
                desc="nidstate_background_migration",
                run_on_all_instances=True,  # this one instance, chosen above
            )

        status.register(api, self)
        setattr(hs, _ATTRIBUTE, self)
        logger.info(
            "synapse-nidstate: mode %s, schema %d, %s",
            config.mode,
            self.schema_version,
            "mirroring events persisted here"
            if self.persists_events
            else "no events persisted by this process",
        )

    async def reclaim_status(self) -> dict[str, Any]:
        """Reclaim in this database and this process, as the status endpoint reports it."""
        groups, rows = await self.reclaimer.database_totals()
        return {
            "background": self.reclaims_in_background,
            "eager": self.config.reclaim.eager,
            "groups_reclaimed": groups,
            "rows_deleted": rows,
            "groups_left": await self.reclaimer.remaining(),
            "here": attr.asdict(self.stats.reclaim),
        }

    async def migration_status(self) -> dict[str, Any]:
        """Where the migration of history stands, as the status endpoint reports it."""
        low, high = await self.migrator.stream_range()
        return {
            "background": self.migrates_in_background,
            "remaining_events": await self.migrator.remaining(),
            "stream_ordering_low": low,
            "stream_ordering_high": high,
            "events_migrated_here": self.stats.migration.events_migrated,
            "batches_here": self.stats.migration.batches,
        }

    @staticmethod
    def parse_config(config: dict[str, Any]) -> NidStateConfig:
        parsed = parse_config(config)
        check_synapse_version(synapse.__version__, parsed)
        check_synapse_internals()  # even with allow_untested_synapse
        # Before Synapse prepares its database: read past the reclaim marker.
        failsafe.install()
        return parsed
