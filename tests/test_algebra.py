"""Tests for :mod:`synapse_nidstate.algebra`.

Most properties are checked against a plain ``dict`` model of the state: a
snapshot is a list of blocks, and whatever the algebra does to it, resolving it
must give the dict we computed by hand.
"""

import random
from array import array

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from synapse_nidstate.algebra import (
    COMPACTED_BLOCKS_TARGET,
    KEY_NID_LIMIT,
    MAX_BLOCKS,
    MAX_KEY_NUMBER,
    MIN_CHUNK_ENTRIES,
    AlgebraError,
    NidFilter,
    SnapshotPlan,
    block_hash,
    block_key_range,
    bounded_difference,
    changes,
    compact,
    delta,
    entries_in_ranges,
    extend,
    flat_key_range,
    full,
    key_number,
    lookup,
    make_block,
    merge_point,
    pack_block,
    pack_nids,
    pack_strings,
    rebase,
    resolve,
    shared_prefix,
    snapshot_hash,
    unpack_block,
    unpack_block_checked,
    unpack_nids,
    unpack_nids_checked,
    unpack_strings,
)
from synapse_nidstate.algebra.state import _is_boundary

# Reproducible, CI-friendly hypothesis settings (no example database on disk).
_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
}

MAX_TYPE = 12
MAX_STATE_KEY = 300
MAX_EVENT = 50

INT64_MAX = 2**63 - 1

# Small NID ranges so that keys collide and get overwritten often.
type_nids = st.integers(1, MAX_TYPE)
state_key_nids = st.integers(1, MAX_STATE_KEY)
event_nids = st.integers(1, MAX_EVENT)
keys = st.tuples(type_nids, state_key_nids)
states = st.dictionaries(keys, event_nids, max_size=60)

# Even smaller ranges for reads, so that filters and lookups hit present keys,
# tombstoned keys and never-seen keys in the same example.
small_types = st.integers(1, 5)
small_state_keys = st.integers(1, 12)
small_keys = st.tuples(small_types, small_state_keys)
# event_nid 0 is a tombstone.
small_blocks = st.dictionaries(small_keys, st.integers(0, 9), max_size=20).map(
    lambda d: make_block((t, s, e) for (t, s), e in d.items())
)
small_block_seqs = st.lists(small_blocks, max_size=8)
# And NIDs past a key number's reach (2^32), now and then.
wide_blocks = st.dictionaries(
    st.tuples(
        st.one_of(small_types, st.just(KEY_NID_LIMIT + 1)),
        st.one_of(small_state_keys, st.just(KEY_NID_LIMIT + 5)),
    ),
    st.integers(0, 9),
    max_size=20,
).map(lambda d: make_block((t, s, e) for (t, s), e in d.items()))

filters = st.builds(
    NidFilter,
    types=st.dictionaries(
        small_types,
        st.one_of(st.none(), st.frozensets(small_state_keys, max_size=4)),
        max_size=4,
    ),
    include_others=st.booleans(),
)


def model_resolve(blocks):
    """An independent, obviously-correct resolve: newest entry per key wins."""
    newest = {}
    for block in blocks:
        for t, s, e in block:
            newest[(t, s)] = e
    return {k: e for k, e in newest.items() if e != 0}


def model_matches(nid_filter, key):
    """Synapse StateFilter semantics, written out independently of NidFilter."""
    t, s = key
    if t in nid_filter.types:
        wanted = nid_filter.types[t]
        return wanted is None or s in wanted
    return nid_filter.include_others


def assert_valid_block(case, block):
    """A block is a tuple of int triples, sorted, one entry per key."""
    case.assertIsInstance(block, tuple)
    case.assertEqual(make_block(block), block)
    for entry in block:
        case.assertIsInstance(entry, tuple)
        case.assertEqual(len(entry), 3)


class Store:
    """An in-memory stand-in for the storage layer.

    Blocks are deduplicated by ``block_hash(block)``; a snapshot
    is a tuple of block NIDs; ``models`` holds, per snapshot, the dict we expect
    it to resolve to.
    """

    def __init__(self, case):
        self.case = case
        self.blocks = {}  # block NID -> Block
        self.by_hash = {}  # content hash -> block NID
        self.snapshots = []  # snapshot index -> tuple of block NIDs
        self.models = []  # snapshot index -> expected state dict
        self.compactions = 0
        self.merges = 0
        self.appends = 0
        self.noops = 0
        self.max_read = 0
        self.longest_lineage = []  # lineage depth per snapshot

    # -- storage ----------------------------------------------------------
    def put_block(self, block):
        assert_valid_block(self.case, block)
        self.case.assertTrue(block, "plans never write empty blocks")
        packed = pack_block(block)
        self.case.assertEqual(unpack_block(packed), block)
        h = block_hash(block)
        nid = self.by_hash.get(h)
        if nid is None:
            nid = len(self.blocks) + 1
            self.by_hash[h] = nid
            self.blocks[nid] = block
        else:
            self.case.assertEqual(self.blocks[nid], block)
        return nid

    def read(self, snap):
        return [self.blocks[nid] for nid in self.snapshots[snap]]

    def state(self, snap):
        return resolve(self.read(snap))

    def _store(self, plan, expected, parent=None):
        nids = tuple(plan.base) + tuple(self.put_block(b) for b in plan.blocks)
        self.snapshots.append(nids)
        self.models.append(dict(expected))
        depth = 0 if parent is None else self.longest_lineage[parent] + 1
        self.longest_lineage.append(depth)
        snap = len(self.snapshots) - 1
        self.check(snap)
        return snap

    def check(self, snap):
        nids = self.snapshots[snap]
        self.case.assertLessEqual(len(nids), MAX_BLOCKS)
        self.max_read = max(self.max_read, len(nids))
        blocks = self.read(snap)
        self.case.assertEqual(resolve(blocks), self.models[snap])
        self.case.assertEqual(model_resolve(blocks), self.models[snap])
        # The stored snapshot survives its own encoding.
        self.case.assertEqual(unpack_nids(pack_nids(nids)), nids)

    # -- operations -------------------------------------------------------
    def build_full(self, state):
        plan = full(state)
        self.case.assertIsInstance(plan, SnapshotPlan)
        self.case.assertTrue(plan.compacted)
        self.case.assertEqual(plan.base, ())
        self.case.assertLessEqual(len(plan.blocks), MAX_BLOCKS // 2)
        return self._store(plan, {k: e for k, e in state.items() if e})

    def store_child(self, parent, new_state):
        """Store ``new_state`` as ``parent`` plus a delta."""
        parent_nids = self.snapshots[parent]
        parent_state = self.state(parent)
        self.case.assertEqual(parent_state, self.models[parent])
        change = delta(parent_state, new_state)
        assert_valid_block(self.case, change)
        # Appending the delta gives the new state, whatever is underneath.
        self.case.assertEqual(resolve([*self.read(parent), change]), new_state)

        calls = []

        def load_parent():
            calls.append(parent)
            return self.read(parent)

        plan = extend(parent_nids, change, load_parent)
        if not change:
            self.case.assertEqual(plan, SnapshotPlan(tuple(parent_nids), (), False))
            self.noops += 1
        elif len(parent_nids) < MAX_BLOCKS:
            self.case.assertFalse(plan.compacted)
            self.case.assertEqual(plan.base, tuple(parent_nids))
            self.case.assertEqual(plan.blocks, (change,))
            self.appends += 1
        elif not plan.compacted:
            # The last blocks merged with the change: a prefix of the parent kept.
            self.case.assertEqual(plan.base, tuple(parent_nids[: len(plan.base)]))
            self.case.assertLessEqual(len(plan.base), MAX_BLOCKS // 2)
            self.case.assertLessEqual(
                len(plan.base) + len(plan.blocks), MAX_BLOCKS - MAX_BLOCKS // 4
            )
            # The merged pieces are disjoint key ranges, in order.
            for block in plan.blocks:
                assert_valid_block(self.case, block)
            for left, right in zip(plan.blocks, plan.blocks[1:]):
                self.case.assertLess(left[-1][:2], right[0][:2])
            self.merges += 1
        else:
            self.case.assertEqual(plan.base, ())
            self.case.assertLessEqual(len(plan.blocks), MAX_BLOCKS // 2)
            self.compactions += 1
        # The parent's blocks are only loaded at the limit.
        self.case.assertEqual(calls, [parent] if len(parent_nids) >= MAX_BLOCKS and change else [])
        return self._store(plan, new_state, parent)

    def apply_delta(self, parent, sets, removes):
        new_state = dict(self.models[parent])
        new_state.update(sets)
        present = sorted(new_state)
        for i in removes:
            if present:
                new_state.pop(present[i % len(present)], None)
        return self.store_child(parent, new_state)

    def merge(self, left, right, right_wins, drops, extra):
        a = self.models[left]
        b = self.models[right]
        merged = {**a, **b} if right_wins else {**b, **a}
        merged.update(extra)
        present = sorted(merged)
        for i in drops:
            if present:
                merged.pop(present[i % len(present)], None)
        # Store against the parent whose delta is smaller.
        d_left = delta(self.state(left), merged)
        d_right = delta(self.state(right), merged)
        best = left if len(d_left) <= len(d_right) else right
        return self.store_child(best, merged)

    def random_chain(self, rng, parent, length):
        """``length`` random deltas, each on top of the previous one."""
        snap = parent
        for _ in range(length):
            sets = {
                (rng.randint(1, MAX_TYPE), rng.randint(1, MAX_STATE_KEY)): rng.randint(1, MAX_EVENT)
                for _ in range(rng.randint(0, 4))
            }
            removes = [rng.randrange(1 << 30) for _ in range(rng.randint(0, 3))]
            snap = self.apply_delta(snap, sets, removes)
        return snap


# Operations for the model-based test. A parent "pick" of None means the most
# recent snapshot (so lineages get long); an int picks any snapshot.
picks = st.one_of(st.none(), st.integers(0, 1 << 16))
removal_indexes = st.lists(st.integers(0, 1 << 30), max_size=4)
operations = st.one_of(
    st.tuples(st.just("chain"), picks, st.integers(1, 150), st.randoms(use_true_random=False)),
    st.tuples(
        st.just("delta"),
        picks,
        st.dictionaries(keys, event_nids, max_size=8),
        removal_indexes,
    ),
    st.tuples(
        st.just("merge"),
        picks,
        picks,
        st.booleans(),
        removal_indexes,
        st.dictionaries(keys, event_nids, max_size=3),
    ),
    st.tuples(st.just("full"), states),
)


class ModelBasedTests(unittest.TestCase):
    def _pick(self, store, pick):
        if pick is None:
            return len(store.snapshots) - 1
        return pick % len(store.snapshots)

    @settings(max_examples=60, **_SETTINGS)
    @given(initial=states, ops=st.lists(operations, min_size=1, max_size=8))
    def test_random_operations_match_dict_model(self, initial, ops):
        store = Store(self)
        store.build_full(initial)
        for op in ops:
            kind = op[0]
            if kind == "chain":
                _, pick, length, rng = op
                store.random_chain(rng, self._pick(store, pick), length)
            elif kind == "delta":
                _, pick, sets, removes = op
                store.apply_delta(self._pick(store, pick), sets, removes)
            elif kind == "merge":
                _, left, right, right_wins, drops, extra = op
                store.merge(
                    self._pick(store, left),
                    self._pick(store, right),
                    right_wins,
                    drops,
                    extra,
                )
            else:
                store.build_full(op[1])
        # Every snapshot still reads back as its model (nothing written later
        # changed an older snapshot's meaning), and reads stay bounded.
        for snap in range(len(store.snapshots)):
            store.check(snap)
            probe = [(t, s) for t in range(1, 4) for s in range(1, 40)]
            probe += list(store.models[snap])[:20]
            self.assertEqual(
                lookup(store.read(snap), probe),
                {k: e for k, e in store.models[snap].items() if k in set(probe)},
            )
        self.assertLessEqual(store.max_read, MAX_BLOCKS)

    def test_long_chain_compacts_and_reads_stay_bounded(self):
        rng = random.Random(1234)
        store = Store(self)
        snap = store.build_full({})
        lengths = []
        for _ in range(700):
            snap = store.random_chain(rng, snap, 1)
            lengths.append(len(store.snapshots[snap]))
        self.assertGreaterEqual(store.compactions, 5)
        self.assertEqual(store.max_read, MAX_BLOCKS)
        self.assertLessEqual(max(lengths), MAX_BLOCKS)
        self.assertGreaterEqual(store.longest_lineage[snap], 700)
        # Right after each compaction the snapshot has room for deltas again.
        for before, after in zip(lengths, lengths[1:], strict=False):
            if after < before:
                self.assertEqual(before, MAX_BLOCKS)
                self.assertLessEqual(after, MAX_BLOCKS // 2)

    def test_merges_of_diverged_lineages(self):
        rng = random.Random(99)
        store = Store(self)
        root = store.build_full({(t, s): 1 for t in range(1, 4) for s in range(1, 200)})
        left = store.random_chain(rng, root, 90)
        right = store.random_chain(rng, root, 140)
        merged = store.merge(left, right, True, [3, 17], {(7, 7): 7})
        # Keep going on the merged lineage past another compaction.
        store.random_chain(rng, merged, 80)
        self.assertGreaterEqual(store.compactions + store.merges, 3)
        self.assertLessEqual(store.max_read, MAX_BLOCKS)


class ExtendTests(unittest.TestCase):
    def _fail_state(self):
        raise AssertionError("parent_state must not be called")

    def test_append_below_limit(self):
        change = make_block([(1, 1, 5)])
        plan = extend([3, 1, 2], change, self._fail_state)
        self.assertEqual(plan, SnapshotPlan((3, 1, 2), (change,), False))

    def test_empty_change_keeps_parent(self):
        parent = list(range(1, MAX_BLOCKS + 1))
        plan = extend(parent, (), self._fail_state)
        self.assertEqual(plan, SnapshotPlan(tuple(parent), (), False))

    def test_compacts_at_limit(self):
        blocks = [make_block([(1, i, i)]) for i in range(1, MAX_BLOCKS + 1)]
        change = make_block([(1, 1, 0), (2, 2, 9), (1, 5, 77)])
        plan = extend(list(range(1, MAX_BLOCKS + 1)), change, lambda: blocks)
        self.assertTrue(plan.compacted)
        self.assertEqual(plan.base, ())
        expected = resolve([*blocks, change])
        self.assertEqual(resolve(plan.blocks), expected)
        self.assertEqual(list(plan.blocks), compact(expected))


    def test_merge_point(self):
        # After a compaction (big blocks) and deltas: the deltas merge.
        self.assertEqual(merge_point([3000] * 16 + [1] * 48, 1), 16)
        # Merged blocks grow until they outweigh the block before them.
        self.assertEqual(merge_point([3000] * 16 + [2900] + [1] * 47, 1), 16)
        self.assertEqual(merge_point([3000] * 15 + [20] + [1] * 48, 1), 15)
        self.assertEqual(merge_point([3000] * 15 + [20, 2990] + [1] * 47, 1), 17)
        # Small blocks only (a small room): compacted instead.
        self.assertIsNone(merge_point([1] * 64, 1))
        # Never fewer than MAX_BLOCKS // 2 appends to the next merge.
        self.assertIsNone(merge_point([1] * 40 + [1000] * 24, 1))

    def test_merges_the_last_blocks_after_a_big_compaction(self):
        # A big state compacted, then one small change after another: at the
        # 64-block limit the changes since the compaction are merged into one
        # block behind the compacted ones, and every snapshot reads as its model.
        rng = random.Random(5)
        store = Store(self)
        snap = store.build_full({(4, s): s for s in range(1, 20001)})
        lengths = []
        for _ in range(400):
            snap = store.random_chain(rng, snap, 1)
            lengths.append(len(store.snapshots[snap]))
        # 400 changes of up to 4 keys hit the limit 7 times or so: merged
        # each time but when the merged changes outweighed a compacted block.
        self.assertGreaterEqual(store.merges, 5)
        self.assertLess(store.compactions, store.merges)
        self.assertLessEqual(max(lengths), MAX_BLOCKS)
        for snapshot in [*range(0, len(store.snapshots), 7), len(store.snapshots) - 1]:
            store.check(snapshot)

    def test_tombstones_survive_a_merge(self):
        base = [make_block([(1, k, k) for k in range(1, 200)])] * 1
        blocks = [*base, *(make_block([(2, k, k)]) for k in range(1, MAX_BLOCKS))]
        change = make_block([(1, 5, 0)])  # removes a key of the first block
        plan = extend(list(range(1, MAX_BLOCKS + 1)), change, lambda: blocks)
        self.assertEqual(plan.base, (1,))
        self.assertFalse(plan.compacted)
        self.assertEqual(resolve([blocks[0], *plan.blocks]), resolve([*blocks, change]))
        self.assertNotIn((1, 5), resolve([blocks[0], *plan.blocks]))


class NidFilterTests(unittest.TestCase):
    @settings(max_examples=200, **_SETTINGS)
    @given(blocks=small_block_seqs, nid_filter=filters)
    # Full state.
    @example(
        blocks=[make_block([(1, 1, 1), (2, 2, 2)]), make_block([(1, 1, 0)])],
        nid_filter=NidFilter({}, True),
    )
    # Nothing.
    @example(blocks=[make_block([(1, 1, 1)])], nid_filter=NidFilter({}, False))
    # Concrete keys only, one tombstoned, one never present.
    @example(
        blocks=[make_block([(1, 1, 1), (1, 2, 2)]), make_block([(1, 2, 0)])],
        nid_filter=NidFilter({1: frozenset({1, 2, 3}), 4: frozenset()}, False),
    )
    # Wildcard type.
    @example(
        blocks=[make_block([(1, 1, 1), (1, 2, 2), (2, 1, 3)])],
        nid_filter=NidFilter({1: None}, False),
    )
    # include_others with a listed type: other keys of that type are excluded.
    @example(
        blocks=[make_block([(1, 1, 1), (1, 2, 2), (2, 1, 3)])],
        nid_filter=NidFilter({1: frozenset({2})}, True),
    )
    def test_apply_matches_filtered_model(self, blocks, nid_filter):
        model = model_resolve(blocks)
        for key in model:
            self.assertEqual(nid_filter.matches(key), model_matches(nid_filter, key))
        expected = {k: e for k, e in model.items() if nid_filter.matches(k)}
        self.assertEqual(nid_filter.apply(blocks), expected)

        self.assertEqual(nid_filter.is_full(), nid_filter.include_others and not nid_filter.types)
        concrete = nid_filter.concrete_keys()
        if concrete is None:
            self.assertTrue(nid_filter.include_others or None in nid_filter.types.values())
        else:
            self.assertEqual(
                set(concrete),
                {(t, s) for t, ks in nid_filter.types.items() for s in ks},
            )

    def test_filter_shapes(self):
        blocks = [
            make_block([(1, 1, 10), (1, 2, 11), (2, 1, 12), (3, 3, 13)]),
            make_block([(1, 2, 0), (2, 2, 14)]),
        ]
        self.assertEqual(
            NidFilter({}, True).apply(blocks),
            {(1, 1): 10, (2, 1): 12, (2, 2): 14, (3, 3): 13},
        )
        self.assertEqual(NidFilter({}, False).apply(blocks), {})
        self.assertEqual(NidFilter({}, False).concrete_keys(), [])
        self.assertEqual(
            NidFilter({1: frozenset({1, 2}), 9: frozenset({1})}, False).apply(blocks),
            {(1, 1): 10},
        )
        self.assertEqual(NidFilter({2: None}, False).apply(blocks), {(2, 1): 12, (2, 2): 14})
        self.assertEqual(
            NidFilter({1: frozenset({1})}, True).apply(blocks),
            {(1, 1): 10, (2, 1): 12, (2, 2): 14, (3, 3): 13},
        )
        self.assertEqual(
            NidFilter({1: frozenset()}, True).apply(blocks),
            {(2, 1): 12, (2, 2): 14, (3, 3): 13},
        )


class KeyRangeTests(unittest.TestCase):
    """A block whose key range meets none of a filter's key ranges cannot change
    the filter's answer: reads leave such blocks out."""

    @settings(max_examples=300, **_SETTINGS)
    @given(blocks=small_block_seqs, nid_filter=filters)
    @example(  # lazy-loading: one member of type 1 and everything else
        blocks=[make_block([(1, 1, 1), (1, 2, 2), (2, 1, 3)]), make_block([(1, 3, 4)])],
        nid_filter=NidFilter({1: frozenset({2})}, True),
    )
    def test_blocks_outside_the_ranges_change_nothing(self, blocks, nid_filter):
        ranges = nid_filter.key_ranges()
        if ranges is None:
            self.assertTrue(nid_filter.is_full())
            return
        self.assertEqual(ranges, sorted(ranges))
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            self.assertLess(hi + 1, lo)  # disjoint, and not adjacent (merged)
        for block in blocks:
            for entry in block:
                inside = any(lo <= key_number(entry[:2]) <= hi for lo, hi in ranges)
                if nid_filter.matches(entry[:2]):
                    self.assertTrue(inside, (entry, ranges))

        def meets(block):
            key_range = block_key_range(block)
            return key_range is None or any(
                lo <= key_range[1] and key_range[0] <= hi for lo, hi in ranges
            )

        self.assertEqual(
            nid_filter.apply([b for b in blocks if meets(b)]), nid_filter.apply(blocks)
        )

    @settings(max_examples=300, **_SETTINGS)
    @given(blocks=st.lists(wide_blocks, max_size=6), nid_filter=filters)
    @example(  # a wildcard type whose state key NIDs pass the key numbers' reach
        blocks=[make_block([(2, 1, 1), (2, KEY_NID_LIMIT + 5, 2), (3, 1, 3)])],
        nid_filter=NidFilter({2: None}, False),
    )
    @example(  # everything but one type, types past the reach too
        blocks=[make_block([(1, 1, 1), (2, 1, 2), (KEY_NID_LIMIT + 1, 1, 3)])],
        nid_filter=NidFilter({2: frozenset({1})}, True),
    )
    def test_entries_in_ranges_change_nothing(self, blocks, nid_filter):
        # What a narrow read keeps of each block, from its flat form.
        ranges = nid_filter.key_ranges()
        if ranges is None:
            return
        sliced = [
            entries_in_ranges(array("q", [n for entry in b for n in entry]), ranges)
            for b in blocks
        ]
        for block, kept in zip(blocks, sliced):
            self.assertEqual(list(kept), sorted(kept))
            self.assertLessEqual(set(kept), set(block))
            for entry in block:
                if nid_filter.matches(entry[:2]):
                    self.assertIn(entry, kept)
        self.assertEqual(nid_filter.apply(sliced), nid_filter.apply(blocks))

    @settings(max_examples=300, **_SETTINGS)
    @given(block=wide_blocks)
    @example(block=make_block([(1, KEY_NID_LIMIT, 1), (2, 1, 2)]))  # a key past the reach
    def test_flat_key_range_is_the_blocks(self, block):
        # What a narrow read caches of a block it holds (flat) for its snapshot.
        self.assertEqual(
            flat_key_range(array("q", [n for entry in block for n in entry])),
            block_key_range(block),
        )

    def test_ranges(self):
        limit = KEY_NID_LIMIT
        self.assertIsNone(NidFilter({}, True).key_ranges())
        self.assertEqual(NidFilter({}, False).key_ranges(), [])
        self.assertEqual(
            NidFilter({5: frozenset({7, 8, 10})}, False).key_ranges(),
            [(5 * limit + 7, 5 * limit + 8), (5 * limit + 10, 5 * limit + 10)],
        )
        self.assertEqual(NidFilter({2: None}, False).key_ranges(), [(2 * limit, 3 * limit - 1)])
        # Lazy-loading members: one member key, and every other type.
        self.assertEqual(
            NidFilter({5: frozenset({7})}, True).key_ranges(),
            [(0, 5 * limit - 1), (5 * limit + 7, 5 * limit + 7), (6 * limit, MAX_KEY_NUMBER)],
        )
        self.assertEqual(len(NidFilter({5: frozenset(range(1, 64))}, False).key_ranges()), 1)
        self.assertIsNone(NidFilter({5: frozenset(range(1, 200, 2))}, False).key_ranges())
        self.assertIsNone(NidFilter({5: frozenset({limit})}, False).key_ranges())

    def test_block_key_range(self):
        limit = KEY_NID_LIMIT
        self.assertIsNone(block_key_range(()))
        self.assertEqual(
            block_key_range(make_block([(3, 9, 1), (2, 4, 2), (3, 1, 3)])),
            (2 * limit + 4, 3 * limit + 9),
        )
        self.assertIsNone(block_key_range(make_block([(2, 4, 2), (3, limit, 1)])))


class LookupTests(unittest.TestCase):
    @settings(max_examples=200, **_SETTINGS)
    @given(blocks=small_block_seqs, wanted=st.lists(small_keys, max_size=15))
    def test_lookup_equals_restricted_resolve(self, blocks, wanted):
        # Also ask for every key the blocks mention, tombstoned or not.
        mentioned = [(t, s) for block in blocks for t, s, _ in block]
        for ks in (wanted, mentioned, wanted + mentioned):
            model = model_resolve(blocks)
            self.assertEqual(lookup(blocks, ks), {k: e for k, e in model.items() if k in set(ks)})
        # Unpacked blocks (as read from the database) behave the same.
        unpacked = [unpack_block(pack_block(b)) for b in blocks]
        self.assertEqual(lookup(unpacked, wanted), lookup(blocks, wanted))

    def test_lookup_tombstones_and_missing(self):
        blocks = [
            make_block([(1, 1, 1), (1, 2, 2), (2, 5, 3)]),
            make_block([(1, 2, 0), (3, 3, 4)]),
            make_block([(2, 5, 9), (3, 3, 0), (4, 4, 0)]),
        ]
        self.assertEqual(
            lookup(blocks, [(1, 1), (1, 2), (2, 5), (3, 3), (4, 4), (9, 9)]),
            {(1, 1): 1, (2, 5): 9},
        )
        self.assertEqual(lookup(blocks, []), {})
        self.assertEqual(lookup([], [(1, 1)]), {})


class ChangesTests(unittest.TestCase):
    @settings(max_examples=300, **_SETTINGS)
    @given(parent=small_block_seqs, appended=small_block_seqs)
    def test_parent_updated_with_changes_is_the_child(self, parent, appended):
        # What the read path builds a child snapshot's state from: its parent's
        # state and the changes of the blocks appended to it.
        state = dict(model_resolve(parent))
        for key, event_nid in changes(appended).items():
            if event_nid:
                state[key] = event_nid
            else:
                state.pop(key, None)
        self.assertEqual(state, model_resolve([*parent, *appended]))
        self.assertEqual(resolve(parent + appended), state)


class DeltaTests(unittest.TestCase):
    @settings(max_examples=200, **_SETTINGS)
    @given(base=states, new=states, blocks=st.lists(states, max_size=3))
    def test_delta_turns_base_into_new(self, base, new, blocks):
        change = delta(base, new)
        assert_valid_block(self, change)
        self.assertEqual(resolve([*compact(base), change]), new)
        # Only changed keys are written.
        changed = {k for k in base.keys() | new.keys() if base.get(k) != new.get(k)}
        self.assertEqual({(t, s) for t, s, _ in change}, changed)
        self.assertEqual(delta(new, new), ())
        # Stacking: whatever blocks produced ``base``, the delta gives ``new``.
        stack = [delta({}, b) for b in blocks]
        stack.append(delta(resolve(stack), base))
        self.assertEqual(resolve(stack), base)
        self.assertEqual(resolve([*stack, change]), new)


class RebaseTests(unittest.TestCase):
    @settings(max_examples=200, **_SETTINGS)
    @given(base=states, new=states)
    def test_rebased_state_is_the_full_state(self, base, new):
        base_blocks = compact(base)
        nids = list(range(1, len(base_blocks) + 1))
        plan = rebase(nids, base_blocks, new)
        by_nid = dict(zip(nids, base_blocks))
        self.assertEqual(resolve([*(by_nid[n] for n in plan.base), *plan.blocks]), new)
        if plan.base:  # kept as a delta: the base's blocks, then the change alone
            self.assertEqual(plan.base, tuple(nids))
            self.assertEqual(plan.blocks, (delta(base, new),) if delta(base, new) else ())
            self.assertFalse(plan.compacted)

    def test_small_difference_is_a_delta_large_one_compacted(self):
        base = {(1, k): k for k in range(1, 1001)}
        near = {**base, (1, 1001): 5000, (1, 3): 0}
        near.pop((1, 3))
        base_blocks = compact(base)
        nids = tuple(range(1, len(base_blocks) + 1))
        plan = rebase(nids, base_blocks, near)
        self.assertEqual(plan, SnapshotPlan(nids, (make_block([(1, 3, 0), (1, 1001, 5000)]),),
                                            False))
        far = {(1, k): k + 1 for k in range(1, 1001)}
        self.assertEqual(rebase(nids, base_blocks, far), full(far))
        # At the 64-block limit, as extend does (small blocks: compacted).
        limit = [make_block([(1, k, base[(1, k)])]) for k in range(1, MAX_BLOCKS + 1)]
        small = {k: e for k, e in base.items() if k[1] <= MAX_BLOCKS}
        changed = {**small, (1, 2): 9}
        self.assertEqual(rebase(range(1, MAX_BLOCKS + 1), limit, changed), full(changed))


class PackingTests(unittest.TestCase):
    @settings(max_examples=200, **_SETTINGS)
    @given(
        entries=st.dictionaries(
            st.tuples(st.integers(1, INT64_MAX), st.integers(1, INT64_MAX)),
            st.integers(0, INT64_MAX),
            max_size=30,
        )
    )
    def test_block_round_trip(self, entries):
        block = make_block((t, s, e) for (t, s), e in entries.items())
        packed = pack_block(block)
        self.assertIsInstance(packed, bytes)
        # int32s when every NID fits, int64s otherwise; a tag byte first.
        fits = all(n < 2**31 for entry in block for n in entry)
        self.assertEqual(len(packed), 1 + (12 if fits else 24) * len(block))
        self.assertEqual(unpack_block(packed), block)
        # Database drivers hand back memoryview / bytearray.
        self.assertEqual(unpack_block(memoryview(packed)), block)
        self.assertEqual(unpack_block(bytearray(packed)), block)
        # The dedupe key is of the content, 128 bits.
        self.assertEqual(block_hash(block), block_hash(unpack_block(packed)))
        self.assertEqual(len(block_hash(block)), 16)

    @settings(max_examples=200, **_SETTINGS)
    @given(
        entries=st.dictionaries(
            st.tuples(st.integers(1, INT64_MAX), st.integers(1, INT64_MAX)),
            st.one_of(st.integers(0, 2**31 - 1), st.integers(0, INT64_MAX)),
            min_size=1,
            max_size=30,
        ),
        data=st.data(),
    )
    def test_checked_decoding_refuses_any_changed_byte(self, entries, data):
        # What a read of the database decodes: the stored bytes against the
        # stored content hash (int32 and int64 forms; negative values, which
        # make_block refuses, are sign-extended all the same).
        block = make_block((t, s, e) for (t, s), e in entries.items())
        packed, digest = pack_block(block), block_hash(block)
        self.assertEqual(unpack_block_checked(packed, digest), block)
        self.assertEqual(unpack_block_checked(memoryview(packed), bytearray(digest)), block)
        position = data.draw(st.integers(1, len(packed) - 1))
        flipped = bytearray(packed)
        flipped[position] ^= 1 << data.draw(st.integers(0, 7))
        with self.assertRaises(AlgebraError):
            unpack_block_checked(bytes(flipped), digest)
        nids = [b for b in range(1, len(block) + 1)]
        self.assertEqual(unpack_nids_checked(pack_nids(nids), snapshot_hash(nids)), tuple(nids))
        with self.assertRaises(AlgebraError):
            unpack_nids_checked(pack_nids(nids[::-1] + [0]), snapshot_hash(nids))
        negative = ((1, 2, -5), (3, 4, -(2**31) + 1))
        self.assertEqual(unpack_block_checked(pack_block(negative), block_hash(negative)), negative)

    @settings(max_examples=200, **_SETTINGS)
    @given(
        nids=st.lists(
            st.one_of(st.integers(0, 70000), st.integers(0, INT64_MAX)), max_size=MAX_BLOCKS
        )
    )
    def test_nids_round_trip(self, nids):
        packed = pack_nids(nids)
        self.assertEqual(len(packed) % 4, 1)
        self.assertEqual(unpack_nids(packed), tuple(nids))
        self.assertEqual(unpack_nids(memoryview(packed)), tuple(nids))
        self.assertEqual(snapshot_hash(nids), snapshot_hash(unpack_nids(packed)))

    def test_nearby_nids_take_a_byte_each(self):
        # The blocks of a snapshot are mostly allocated together.
        nids = list(range(100_000, 100_040)) + [99_000, 100_041]
        packed = pack_nids(nids)
        self.assertLessEqual(len(packed), 1 + 3 + 4 + len(nids) + 3)
        self.assertEqual(unpack_nids(packed), tuple(nids))

    @settings(max_examples=200, **_SETTINGS)
    @given(
        entries=st.dictionaries(keys, st.integers(0, INT64_MAX), min_size=1, max_size=10),
        data=st.data(),
    )
    def test_truncated_block_raises(self, entries, data):
        block = make_block((t, s, e) for (t, s), e in entries.items())
        packed = pack_block(block)
        entry_size = (len(packed) - 1) // len(block)
        cut = data.draw(st.integers(1, len(packed)).filter(lambda n: n % entry_size))
        with self.assertRaises(AlgebraError):
            unpack_block(packed[: len(packed) - cut])

    @settings(max_examples=200, **_SETTINGS)
    @given(nids=st.lists(st.integers(0, INT64_MAX), min_size=1, max_size=MAX_BLOCKS), data=st.data())
    def test_truncated_nids_raise(self, nids, data):
        packed = pack_nids(nids)
        # Cutting into the values (not only the zero padding) is always seen.
        padding = len(packed) - len(packed.rstrip(b"\0"))
        cut = data.draw(st.integers(padding + 1, len(packed)))
        with self.assertRaises(AlgebraError):
            unpack_nids(packed[: len(packed) - cut])

    def test_encodings(self):
        self.assertEqual(pack_block(((1, 2, 3),)), bytes([4, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]))
        self.assertEqual(pack_block(((1, 2, 2**40),))[0], 8)
        self.assertEqual(unpack_block(pack_block(())), ())
        # count 2, then zigzag deltas +1 (2) and +257 (514 = 0x82 0x04), padding.
        self.assertEqual(pack_nids([1, 258]), bytes([1, 2, 2, 0x82, 0x04]))
        self.assertEqual(pack_nids([5, 3]), bytes([1, 2, 10, 3, 0]))
        self.assertEqual(unpack_nids(pack_nids([])), ())
        for bad in (b"", b"\x00", b"\x07\x00\x00\x00\x00"):
            with self.assertRaises(AlgebraError):
                unpack_block(bad)
        for bad in (b"", b"\x01\x00\x00", b"\x02\x00\x00\x00\x00", b"\x01\x05\x00\x00\x00"):
            with self.assertRaises(AlgebraError):
                unpack_nids(bad)


def random_state(seed, size, max_type=50):
    """A state with ``size`` distinct keys, built from a seed (fast for 50k)."""
    rng = random.Random(seed)
    key_space = max(size * 4, 1000)
    raw = rng.sample(range(key_space), size)
    return {(k % max_type + 1, k // max_type + 1): rng.randint(1, 10**9) for k in raw}


def blocks_not_in(a, b):
    """How many of ``a``'s blocks ``b`` lacks (what storage would newly write)."""
    return len(set(a) - set(b))


def _modulus(entries: int) -> int:
    """The expected block size compact() uses for a state of this many entries."""
    modulus = MIN_CHUNK_ENTRIES
    while modulus * COMPACTED_BLOCKS_TARGET < entries:
        modulus *= 2
    return modulus


class CompactTests(unittest.TestCase):
    def assert_good_compaction(self, state, blocks):
        expected = {k: e for k, e in state.items() if e}
        self.assertLessEqual(len(blocks), MAX_BLOCKS // 2)
        self.assertEqual(resolve(blocks), expected)
        for block in blocks:
            assert_valid_block(self, block)
            self.assertTrue(block)
        # Blocks are disjoint and in key order; every block but the last ends
        # on a boundary key (content-defined cuts, no minimum size), unless the
        # pairwise merge for too many cuts ran.
        flat = [entry for block in blocks for entry in block]
        self.assertEqual(make_block(flat), tuple(flat))
        self.assertEqual(len(flat), len(expected))
        modulus = MIN_CHUNK_ENTRIES
        while modulus * COMPACTED_BLOCKS_TARGET < len(flat):
            modulus *= 2
        cuts = [i for i, entry in enumerate(flat) if _is_boundary(entry[:2], modulus)]
        if blocks and len([c for c in cuts if c != len(flat) - 1]) < MAX_BLOCKS // 2:
            ends = [sum(len(b) for b in blocks[: j + 1]) - 1 for j in range(len(blocks))]
            self.assertEqual(
                [e for e in ends if e != len(flat) - 1], [c for c in cuts if c != len(flat) - 1]
            )

    @settings(max_examples=40, **_SETTINGS)
    @given(seed=st.integers(0, 2**32), size=st.integers(0, 50_000))
    def test_compact_large_states(self, seed, size):
        state = random_state(seed, size)
        blocks = compact(state)
        self.assert_good_compaction(state, blocks)
        # Deterministic, whatever the dict's insertion order.
        self.assertEqual(compact(dict(reversed(list(state.items())))), blocks)
        self.assertEqual(list(full(state).blocks), blocks)

    @settings(max_examples=200, **_SETTINGS)
    @given(state=st.dictionaries(keys, st.integers(0, MAX_EVENT), max_size=400))
    def test_compact_small_states(self, state):
        blocks = compact(state)
        self.assert_good_compaction(state, blocks)
        self.assertEqual(compact(dict(sorted(state.items(), reverse=True))), blocks)

    def test_empty_state(self):
        self.assertEqual(compact({}), [])
        self.assertEqual(compact({(1, 1): 0}), [])
        self.assertEqual(full({}), SnapshotPlan((), (), True))

    def test_unlucky_hashes_are_merged(self):
        # Every key is a boundary for the modulus 3000 entries use (256), so
        # the first pass cuts every MIN_CHUNK_ENTRIES entries: 46 blocks.
        hits = []
        t = 0
        while len(hits) < 3000:
            t += 1
            hits.extend((t, s) for s in range(1, 33) if _is_boundary((t, s), 256))
        state = {k: 1 for k in hits[:3000]}
        self.assertGreater(3000 // MIN_CHUNK_ENTRIES, MAX_BLOCKS // 2)
        blocks = compact(state)
        self.assert_good_compaction(state, blocks)
        self.assertGreater(len(blocks), COMPACTED_BLOCKS_TARGET)

    @settings(max_examples=60, **_SETTINGS)
    @given(
        seed=st.integers(0, 2**32),
        size=st.integers(1000, 5000),
        how=st.sampled_from(["change", "add", "remove"]),
        which=st.integers(0, 2**32),
    )
    def test_one_key_change_shares_blocks(self, seed, size, how, which):
        state = random_state(seed, size)
        other = dict(state)
        present = sorted(state)
        key = present[which % len(present)]
        if how == "change":
            other[key] += 1
        elif how == "remove":
            del other[key]
        else:
            t, s = key
            while (t, s) in other:
                s += 1
            other[(t, s)] = 1
        # Documented exception: crossing a power of two changes the block size
        # (see test_block_size_doubles_past_a_power_of_two).
        assume(_modulus(len(state)) == _modulus(len(other)))
        a = compact(state)
        b = compact(other)
        if how == "change":
            # Same keys, same cuts: exactly one block differs.
            self.assertEqual(len(a), len(b))
            self.assertEqual(blocks_not_in(a, b), 1)
            self.assertEqual(blocks_not_in(b, a), 1)
        else:
            self.assertLessEqual(blocks_not_in(a, b), 2)
            self.assertLessEqual(blocks_not_in(b, a), 2)

    # The two tests below pin down cases that once broke compact()'s promise
    # that "two compactions of states that differ in a few keys share all the
    # other blocks".

    def test_block_size_doubles_past_a_power_of_two(self):
        # 2048 entries use modulus 128, 2049 use 256: the documented case where
        # a compaction shares nothing with the previous one, but stays right.
        state = {(1, s): 7 for s in range(1, 2049)}
        other = {**state, (2, 1): 7}
        a = compact(state)
        b = compact(other)
        self.assertEqual(resolve(b), other)
        self.assertLessEqual(len(b), MAX_BLOCKS // 2)
        self.assertLessEqual(len(b), len(a))
        # One key less on the other side of the threshold shares again.
        smaller = {k: v for k, v in state.items() if k != (1, 5)}
        self.assertLessEqual(blocks_not_in(compact(smaller), a), 1)

    def test_one_key_insert_does_not_cascade(self):
        # (1, 2028) is a boundary key. With it, the cuts are ...2028 | 2118 |
        # 2291; without it, 2082 | 2291 (2118 is now too close to 2082 to be
        # a cut, and 2082 was too close to 2028 before). Inserting the key
        # therefore writes three new blocks.
        state = {(1, s): 1 for s in range(1, 3001) if s != 2028}
        other = {**state, (1, 2028): 1}
        a = compact(state)
        b = compact(other)
        self.assertLessEqual(blocks_not_in(b, a), 2)
        self.assertLessEqual(blocks_not_in(a, b), 2)


class MakeBlockTests(unittest.TestCase):
    @settings(max_examples=200, **_SETTINGS)
    @given(entries=st.dictionaries(keys, st.integers(0, MAX_EVENT), max_size=50))
    def test_sorted_and_unique(self, entries):
        triples = [(t, s, e) for (t, s), e in entries.items()]
        block = make_block(reversed(triples))
        self.assertEqual(list(block), sorted(triples))
        self.assertEqual(make_block(block), block)

    @settings(max_examples=200, **_SETTINGS)
    @given(
        entries=st.dictionaries(keys, event_nids, min_size=1, max_size=20),
        data=st.data(),
    )
    def test_rejects_duplicate_keys(self, entries, data):
        triples = [(t, s, e) for (t, s), e in entries.items()]
        t, s, e = data.draw(st.sampled_from(triples))
        dup = (t, s, data.draw(st.integers(0, MAX_EVENT)))
        with self.assertRaises(AlgebraError):
            make_block([*triples, dup])

    @settings(max_examples=200, **_SETTINGS)
    @given(
        good=st.dictionaries(keys, event_nids, max_size=10),
        bad=st.one_of(
            st.tuples(st.integers(-5, 0), state_key_nids, event_nids),
            st.tuples(type_nids, st.integers(-5, 0), event_nids),
            st.tuples(type_nids, state_key_nids, st.integers(-5, -1)),
        ),
    )
    def test_rejects_non_positive_nids(self, good, bad):
        triples = [(t, s, e) for (t, s), e in good.items()]
        with self.assertRaises(AlgebraError):
            make_block([*triples, bad])

    def test_examples(self):
        self.assertEqual(make_block([]), ())
        self.assertEqual(make_block([(2, 1, 1), (1, 2, 0)]), ((1, 2, 0), (2, 1, 1)))
        for bad in (
            [(1, 1, 1), (1, 1, 1)],
            [(1, 1, 1), (1, 1, 2)],
            [(0, 1, 1)],
            [(1, 0, 1)],
            [(-1, 1, 1)],
            [(1, 1, -1)],
        ):
            with self.assertRaises(AlgebraError):
                make_block(bad)


class BlockStringsTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["m.room.member", "m.room.topic", "x.custom", ""]),
                st.text(max_size=8),
                st.text(min_size=1, max_size=8),
            ),
            max_size=40,
        )
    )
    def test_round_trip(self, entries: list[tuple[str, str, str]]) -> None:
        entries.sort(key=lambda e: e[0])  # a block's entries: a type's are consecutive
        types, keys, events = ([e[i] for e in entries] for i in range(3))
        packed = pack_strings(types, keys, events)
        if any("\n" in s for e in entries for s in e):
            self.assertEqual(packed, "")
            self.assertIsNone(unpack_strings(packed, len(entries)))
        else:
            unpacked = unpack_strings(packed, len(entries))
            assert unpacked is not None
            runs, unpacked_keys, unpacked_events = unpacked
            self.assertEqual([t for t, n in runs for _ in range(n)], types)
            self.assertEqual([t for t, _ in runs], [t for i, t in enumerate(types) if t not in types[:i]])
            self.assertEqual((unpacked_keys, unpacked_events), (keys, events))

    def test_strings_that_do_not_fit_the_block(self) -> None:
        packed = pack_strings(["t", "t", "u"], ["a", "b", ""], ["$1", "$2", "$3"])
        self.assertEqual(packed.split("\n")[:5], ["2", "t", "2", "u", "1"])
        for text, entries in (
            (packed, 2),  # a block of fewer entries
            (packed, 4),
            (packed.rsplit("\n", 1)[0], 3),  # an event ID lost
            ("x" + packed, 3),  # not a count
            ("5\nt\n2", 3),  # runs cut short
            ("2\nt\n3\nu\n0\na\nb\n\n$1\n$2\n$3", 3),  # an empty run
        ):
            with self.assertRaises(AlgebraError, msg=(text, entries)):
                unpack_strings(text, entries)


class BoundedDifferenceTests(unittest.TestCase):
    """``bounded_difference``: how the resolved-state cache keeps a whole state
    as its changes against a related base (storage/resolved.py)."""

    maps = st.dictionaries(st.integers(0, 30), st.text(max_size=2), max_size=25)

    @settings(max_examples=500, **_SETTINGS)
    @given(state=maps, base=maps, most=st.integers(0, 60))
    def test_applied_to_the_base_gives_the_state(self, state, base, most) -> None:
        changes = bounded_difference(state, base, most)
        differing = {k for k in state.keys() | base.keys() if state.get(k) != base.get(k)}
        if len(differing) > most:
            self.assertIsNone(changes)
            return
        assert changes is not None
        self.assertEqual(set(changes), differing)
        rebuilt = dict(base)
        for key, value in changes.items():
            if value is None:
                rebuilt.pop(key, None)
            else:
                rebuilt[key] = value
        self.assertEqual(rebuilt, state)

    def test_shared_prefix(self) -> None:
        self.assertEqual(shared_prefix((1, 2, 3), (1, 2, 4, 5)), 2)
        self.assertEqual(shared_prefix((), (1,)), 0)
        self.assertEqual(shared_prefix((7, 8), (7, 8)), 2)
