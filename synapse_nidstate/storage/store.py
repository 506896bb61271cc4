"""The store: every part of the NID tables' storage layer, as one object.

Built like Synapse's ``DataStore``, from one class per concern, each in its own
file, each building on the one before: ``base`` (pool and caches),
``interning`` (strings to NIDs), ``snapshots`` (where a snapshot is built and
written), ``resolved`` (whole states as strings, cached per base), ``reads``
(the state at events, filtered), ``groups``
(Synapse's state groups from the snapshots), ``reclaim`` (deleting Synapse's
rows that the snapshots replace, each proved first, by its delta in ``proofs``
where it can; writing them back),
``purge`` (following Synapse's purges). The schema and its per-engine SQL are
in ``schema`` and ``sql/<engine>/``; ``savepoint`` contains the module's work
inside Synapse's transactions.
"""

from synapse_nidstate.storage.purge import PurgeStore


class NidStore(PurgeStore):
    """Reads and writes the module's tables in Synapse's main database."""
