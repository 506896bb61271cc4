"""Giving back to the system the memory the module's big reads leave freed.

A whole read of a big room's state decodes tens of thousands of entries at
once: its block strings split, its maps by NID, its answer. Once freed, that
memory stays in glibc's heaps, below what the caches keep, and the process's
resident memory with it: at HQ scale, after the realistic mix, glibc kept
14.0-14.2 MiB freed in the module's process against 1.0 MiB in Synapse's
alone (``benchmarks.mix``, which reports ``mallinfo2``; docs/benchmarks.md,
session 30), most of it in the heap of a database thread. glibc returns
such pages only from the top of a heap, or when asked: ``malloc_trim(0)``
gives back every whole free page of every heap (1.4-1.6 ms there, on a
thread of Synapse's pool; ``benchmarks.mix`` prints the releases).

So a read that built a whole state of at least
``NidStore.BIG_READ_ENTRIES`` entries kicks a release
(:meth:`FreedMemory.kick`): a second later, when the request that asked has
let its answer go, and once however many reads kicked meanwhile. Nothing is
released that is in use; where the C library is not glibc, nothing is done.
``trim_freed_memory: false`` turns it off.
"""

import ctypes
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from synapse.logging.context import defer_to_thread

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi
    from synapse.types import ISynapseReactor

logger = logging.getLogger(__name__)

#: Seconds between a big read and the release: the request that asked still
#: holds its answer when the read's transaction ends.
DELAY = 1.0


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class FreedMemory:
    def __init__(self, api: "ModuleApi", reactor: "ISynapseReactor") -> None:
        self._api = api
        self._reactor = reactor
        self._trim = malloc_trim()
        self._pending = False
        #: Releases done, and the seconds they took (``benchmarks.mix``, tests).
        self.releases = 0
        self.seconds = 0.0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def kick(self) -> None:
        """A big read ended: release the freed memory soon (once, however
        many reads kick before it runs)."""
        if self._trim is None or self._pending:
            return
        self._pending = True
        self._api.run_as_background_process("nidstate_trim_freed_memory", self._release)

    async def _release(self) -> None:
        try:
            await self._api.sleep(DELAY)
            self._pending = False  # a read that ends from now on kicks again
            await defer_to_thread(self._reactor, self._release_now)
        except Exception:
            logger.exception("synapse-nidstate: could not release freed memory")
        finally:
            self._pending = False

    def _release_now(self) -> None:
        assert self._trim is not None
        started = time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - started
        self.releases += 1
        self.seconds += took
        logger.debug("synapse-nidstate: released freed memory in %.1f ms", took * 1000)
