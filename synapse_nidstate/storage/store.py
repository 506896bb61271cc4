"""The store: every part of the NID tables' storage layer, as one object.

Built like Synapse's ``DataStore``: one class per concern, each in its own
file, composed over one base (``base``: the pool, and how a transaction's
learnt values reach the caches). Each part builds on the parts it uses, and
declares the caches it fills:

* the write side: ``interning`` (strings to NIDs) and ``snapshots`` (where a
  snapshot is built and written), on ``blocks``;
* the read side: ``blocks`` (group -> snapshot -> block list -> blocks, read
  and checked, with the strings stored beside them that ``block_strings``
  fills), ``strings`` (NIDs to strings), ``resolved`` (whole states as strings, cached per base),
  ``reads`` (the state at events and of snapshots, filtered: one read, cold
  and warm), ``split_cache`` (narrow answers, kept as Synapse keeps a group's),
  ``groups`` (Synapse's state groups from the snapshots, chains walked in one
  query);
* reclaim: ``proofs`` (a group proved by its delta) under ``reclaim`` (deleting
  Synapse's rows that the snapshots replace, each proved first; writing them
  back), and ``purge`` (following Synapse's purges).

The schema and its per-engine SQL are in ``schema`` and ``sql/<engine>/``;
``savepoint`` contains the module's work inside Synapse's transactions.
"""

from synapse_nidstate.storage.block_strings import BlockStringsStore
from synapse_nidstate.storage.purge import PurgeStore
from synapse_nidstate.storage.snapshots import SnapshotStore


class NidStore(PurgeStore, SnapshotStore, BlockStringsStore):
    """Reads and writes the module's tables in Synapse's main database."""
