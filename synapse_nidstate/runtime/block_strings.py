"""Filling the strings beside blocks the live mirror writes.

The migration gives the blocks of the history their strings
(``storage/block_strings.py``); a compaction or merge the live mirror writes
later gets them here, soon after its event's transaction commits, in a
background process of the persisting Synapse process: a page a transaction
until none is left. Never needed for an answer (a block without its strings
is read by NID), so a failure is logged and the next big write tries again.
"""

import logging
from typing import TYPE_CHECKING

from synapse_nidstate.runtime.metrics import BlockStringsStats
from synapse_nidstate.storage import NidStore

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

logger = logging.getLogger(__name__)


class BlockStringsFiller:
    def __init__(self, api: "ModuleApi", store: NidStore, stats: BlockStringsStats) -> None:
        self._api = api
        self._store = store
        self._stats = stats
        self._running = False
        self._again = False

    def kick(self) -> None:
        """Blocks that should carry their strings were written: fill them
        (once a run in progress ends, if one is)."""
        if self._running:
            self._again = True
            return
        self._running = True
        self._api.run_as_background_process("nidstate_fill_block_strings", self._run)

    async def _run(self) -> None:
        try:
            again = True
            while again:
                self._again = False
                while done := await self._store.fill_block_strings(max_pages=1):
                    self._stats.live += done  # counted as each page commits
                again = self._again
        except Exception:
            self._stats.live_failures += 1
            logger.exception("synapse-nidstate: could not give new blocks their strings")
        finally:
            self._running = False
