"""The split caches (``storage.split_cache``): what a snapshot's parts answer,
against Synapse's own ``DictionaryCache`` filled by the same reads.

A snapshot's state never changes, so every answer a cache gives must be the
state filtered; and the caches must answer wherever Synapse's per-group caches,
filled with the same reads, would (without eviction), so that a warm read
never goes to the database where Synapse's would not.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from synapse.api.constants import EventTypes
from synapse.types.state import StateFilter
from synapse.util.caches.dictionary_cache import DictionaryCache
from synapse.util.clock import Clock
from twisted.internet import reactor
from twisted.trial import unittest

from synapse_nidstate.storage.split_cache import SplitStateCache

#: One snapshot's state: members and other keys, some present, some never.
STATE = {
    **{(EventTypes.Member, f"@u{i}:x"): f"$m{i}" for i in range(6)},
    (EventTypes.Create, ""): "$create",
    (EventTypes.JoinRules, ""): "$join",
    (EventTypes.Name, ""): "$name",
}
ABSENT = [(EventTypes.Member, "@gone:x"), (EventTypes.Topic, "")]
KEYS = sorted(STATE) + ABSENT


def _filter(keys: list[tuple[str, str]], members_whole: bool, others: bool) -> StateFilter:
    """A filter of concrete keys, optionally all members, optionally the
    rest (lazy-loading's ``include_others``)."""
    types: dict[str, set[str] | None] = {}
    for event_type, state_key in keys:
        types.setdefault(event_type, set()).add(state_key)  # type: ignore[union-attr]
    if members_whole:
        types[EventTypes.Member] = None
    return StateFilter.freeze(types, include_others=others)


filters = st.builds(
    _filter,
    st.lists(st.sampled_from(KEYS), max_size=5),
    st.booleans(),
    st.booleans(),
)


def _synapse_read(caches: tuple[DictionaryCache, DictionaryCache], state_filter: StateFilter) -> dict | None:
    """What Synapse's ``_get_state_for_group_using_cache`` would answer from
    its two caches for snapshot 1: None where it would read the database."""
    answer = {}
    for cache, part in zip(caches, state_filter.get_member_split()):
        keys = None if part.has_wildcards() else list(part.concrete_types())
        entry = cache.get(1, dict_keys=keys)
        if not entry.full:
            if part.is_full() or keys is None:
                return None
            if any(k not in entry.value and k not in entry.known_absent for k in keys):
                return None
        answer.update(part.filter_state(entry.value))
    return answer


class SplitCacheTest(unittest.TestCase):
    def _caches(self) -> tuple[SplitStateCache, tuple[DictionaryCache, DictionaryCache]]:
        clock = Clock(reactor, server_name="test")  # type: ignore[arg-type]
        ours = SplitStateCache(clock, "test", 10_000)
        synapses = tuple(
            DictionaryCache(name=f"test_{n}", clock=clock, server_name="test", max_entries=10_000)
            for n in ("members", "non_members")
        )
        return ours, synapses  # type: ignore[return-value]

    def setUp(self) -> None:
        self._shared = self._caches()

    @settings(max_examples=300, deadline=None)
    @given(reads=st.lists(filters, max_size=6), asked=filters)
    def test_answers_as_synapses_caches_would(self, reads: list[StateFilter], asked: StateFilter) -> None:
        # One set of caches for every example, emptied (a new LruCache each
        # example makes Synapse's global lists slow hypothesis down).
        ours, (members, non_members) = self._shared
        ours.invalidate_all()
        for cache in (members, non_members):
            cache.invalidate_all()
        for state_filter in reads:
            # What a read with this filter fetched, as the read path fills.
            fetched = state_filter.filter_state(STATE)
            ours.fill({1: fetched}, state_filter, ours.sequence)
            member_filter, non_member_filter = state_filter.get_member_split()
            for cache, part in ((members, member_filter), (non_members, non_member_filter)):
                cache.update(
                    cache.sequence,
                    1,
                    part.filter_state(fetched),
                    None if part.is_full() else part.concrete_types(),
                )
        got = ours.get(1, ours.prepare(asked))
        synapses = _synapse_read((members, non_members), asked)
        self.assertEqual(got is None, synapses is None, (reads, asked))
        if got is not None:
            self.assertEqual(got, asked.filter_state(STATE))

    def test_a_snapshot_is_one_node_sized_by_its_keys(self) -> None:
        ours, _ = self._caches()
        wanted = StateFilter.from_types([(EventTypes.Member, "@u1:x"), (EventTypes.Member, "@gone:x")])
        ours.fill({1: wanted.filter_state(STATE)}, wanted, ours.sequence)
        self.assertEqual(len(ours.cache.cache), 1)
        self.assertEqual(len(ours.cache), 2)  # one key, one known absent
        more = StateFilter.from_types([(EventTypes.Member, "@u2:x")])
        ours.fill({1: more.filter_state(STATE)}, more, ours.sequence)
        self.assertEqual(len(ours.cache.cache), 1)
        self.assertEqual(len(ours.cache), 3)
        # Filters that want nothing else leave the other part unknown.
        parts = ours.cache.get(1)
        assert parts is not None
        self.assertIsNone(parts[1])
        # The rest added: the same node, both parts counted.
        name = StateFilter.from_types([(EventTypes.Name, "")])
        ours.fill({1: name.filter_state(STATE)}, name, ours.sequence)
        self.assertEqual(len(ours.cache.cache), 1)
        self.assertEqual(len(ours.cache), 4)
        # Asked again, a key it knows adds nothing (the node is not replaced).
        parts = ours.cache.get(1)
        ours.fill({1: more.filter_state(STATE)}, more, ours.sequence)
        self.assertIs(ours.cache.get(1), parts)

    def test_a_fill_prepared_before_an_invalidation_is_dropped(self) -> None:
        ours, _ = self._caches()
        wanted = StateFilter.from_types([(EventTypes.Member, "@u1:x"), (EventTypes.Name, "")])
        sequence = ours.sequence
        ours.invalidate_all()
        ours.fill({1: wanted.filter_state(STATE)}, wanted, sequence)
        self.assertIsNone(ours.cache.get(1))
        ours.fill({1: wanted.filter_state(STATE)}, wanted, ours.sequence)
        self.assertIsNotNone(ours.cache.get(1))

    def test_whole_part_answers_any_keys_of_it(self) -> None:
        ours, _ = self._caches()
        members = StateFilter.from_types([(EventTypes.Member, None)])
        ours.fill({1: members.filter_state(STATE)}, members, ours.sequence)
        parts = ours.cache.get(1)
        assert parts is not None and parts[0] is not None
        self.assertTrue(parts[0].full)
        self.assertEqual(len(ours.cache), 6)
        one = StateFilter.from_types([(EventTypes.Member, "@u3:x"), (EventTypes.Member, "@gone:x")])
        self.assertEqual(ours.get(1, ours.prepare(one)), {(EventTypes.Member, "@u3:x"): "$m3"})
        # A later narrow fill does not replace what is whole.
        ours.fill({1: one.filter_state(STATE)}, one, ours.sequence)
        self.assertIs(ours.cache.get(1), parts)

    def test_parts_of_many_snapshots_share_one_tuple_a_key(self) -> None:
        ours, _ = self._caches()
        wanted = StateFilter.from_types([(EventTypes.Member, "@u1:x"), (EventTypes.Name, "")])
        # Each read's answer comes with tuples of its own (new ones here).
        answers = {
            snapshot: {(t, k): e for (t, k), e in wanted.filter_state(STATE).items()}
            for snapshot in (1, 2)
        }
        self.assertIsNot(*(next(iter(a)) for a in answers.values()))
        ours.fill(answers, wanted, ours.sequence)
        first, second = ours.cache.get(1), ours.cache.get(2)
        assert first is not None and second is not None
        for a, b in zip(first, second, strict=True):
            assert a is not None and b is not None
            self.assertEqual(a.value, b.value)
            for key in a.value:
                self.assertIs(next(k for k in b.value if k == key), key)
        # Bounded: once it holds more keys than the cache may, it starts over.
        ours._keys.update({("x", str(i)): ("x", str(i)) for i in range(ours.cache.max_size)})
        ours.fill({3: {(t, k): e for (t, k), e in answers[1].items()}}, wanted, ours.sequence)
        self.assertEqual(len(ours._keys), 2)
        third = ours.cache.get(3)
        assert third is not None and third[0] is not None and first[0] is not None
        self.assertIsNot(next(iter(third[0].value)), next(iter(first[0].value)))
