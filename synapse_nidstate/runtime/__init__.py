"""What runs inside Synapse: the module Synapse loads (``module``), its config,
the Synapse methods it wraps (``hooks``: where Synapse calls us), the mirror of
persisted events (``mirror``), the state-at-event lookups (``lookups``), the
migration of history (``migration``), metrics and the status endpoint."""
