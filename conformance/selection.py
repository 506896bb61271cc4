"""Which of Synapse's own tests the conformance job runs, and why.

Chosen by what reaches room state (state at events, state groups, state
resolution, membership, visibility, purges), not by what passes. Every entry is
a module or package of Synapse's ``tests`` as in its source distribution;
an entry a release does not have is reported and skipped.
"""

#: (trial name, what of the module it exercises)
SELECTION: tuple[tuple[str, str], ...] = (
    # Storage and state
    ("tests.storage.test_state", "state groups written and read back, StateFilter of every kind"),
    ("tests.storage.test_state_deletion", "deletion of unreferenced state groups"),
    ("tests.storage.test_purge", "purge history and rooms: the module's purge wrappers"),
    ("tests.storage.test_events", "persisting events, extremities, state after forks"),
    ("tests.storage.test_roommember", "membership read from current state and state groups"),
    ("tests.storage.test_redaction", "redacted state events in state"),
    ("tests.test_state", "state resolution through the state handler and storage"),
    ("tests.test_visibility", "history visibility: state-at-event lookups per event"),
    # Handlers
    ("tests.handlers.test_room_member", "joins, leaves, invites, bans"),
    ("tests.handlers.test_message", "event creation: state at prev events"),
    ("tests.handlers.test_federation", "federation handler: backfill, state at remote events"),
    ("tests.handlers.test_federation_event", "outliers, rejected events, partial state"),
    ("tests.handlers.test_sync", "sync: state at timeline events, lazy-loaded members"),
    ("tests.handlers.test_room_summary", "room summaries from state"),
    # Client API
    ("tests.rest.client.test_rooms", "/messages, /context, /members, /state, room creation"),
    ("tests.rest.client.test_sync", "/sync, lazy-loading members"),
    ("tests.rest.client.sliding_sync.test_rooms_required_state", "sliding sync required_state"),
    ("tests.rest.client.sliding_sync.test_rooms_timeline", "sliding sync timelines and visibility"),
    ("tests.rest.client.test_relations", "relations and threads, with visibility filtering"),
    ("tests.rest.client.test_redactions", "redactions of state and messages"),
    ("tests.rest.client.test_upgrade_room", "room upgrades: state copied across rooms"),
    # Federation
    ("tests.federation.test_federation_server", "federation /state, /state_ids, joins"),
    (
        "tests.federation.test_federation_out_of_band_membership",
        "out-of-band membership (outliers)",
    ),
    # Admin: purge and room deletion
    ("tests.rest.admin.test_room", "room deletion, purge history, the admin room APIs"),
    # Replication and workers
    ("tests.replication.storage.test_events", "events replicated to a worker's stores"),
    ("tests.replication.test_sharded_event_persister", "several event persisters"),
)


#: Tests of Synapse's that observe what the module changes in mode serve,
#: each with when it applies ("serve": every serve run; "eager": with
#: ``--eager``) and why. The runner reports them apart, and fails if one
#: passes where it applies (the entry is stale).
#:
#: * Synapse's per-group state caches stay empty for the groups the module
#:   answers: its own caches stand in for them (``runtime/group_caches.py``).
#: * A test that counts a request's database transactions exactly sees one
#:   fewer: a read the module answers from its caches.
KNOWN_DIFFERENCES: dict[str, tuple[str, str]] = {
    "tests.storage.test_state.StateStoreTestCase.test_get_state_for_event": (
        "serve",
        "its first part asks get_state_for_event with each filter and passes with "
        "the module; then it reads Synapse's per-group caches directly "
        "(_get_state_for_group_using_cache on _state_group_cache) and expects the "
        "group's state there (line 265 of 1.163.2)",
    ),
    "tests.rest.client.test_rooms.RoomsCreateTestCase.test_post_room_no_keys": (
        "serve",
        "counts createRoom's database transactions (35); with the module serving, one "
        "fewer: 34. A narrow state read is answered from the module's caches where it "
        "ran a transaction: its types' and state keys' strings were cached one way "
        "only (string to NID, by the read that learnt them) and missed the other way. "
        "Since c5911b9 a read knows them without that cache: the schema's fixed "
        "strings (FIXED_NIDS) and its own filter's; either alone saves the "
        "transaction (tried). With eager reclaim it was one fewer already (2086f97), "
        "and still is (answers equal)",
    ),
    "tests.rest.client.test_rooms.RoomsCreateTestCase.test_post_room_initial_state": (
        "serve",
        "counts createRoom's database transactions (37); as above, one fewer: 36",
    ),
}
