"""ResolvedState.filter and ResolvedChanges.filter answer exactly as Synapse's
StateFilter.filter_state."""

from hypothesis import given, settings
from hypothesis import strategies as st
from synapse.types.state import StateFilter
from twisted.trial import unittest

from synapse_nidstate.storage import ResolvedChanges, ResolvedState

TYPES = ["m.room.member", "m.room.name", "m.room.topic", "m.room.create", "x.custom"]
KEYS = ["", "@a:hs", "@b:hs", "@c:hs", "k"]

states = st.dictionaries(
    st.tuples(st.sampled_from(TYPES), st.sampled_from(KEYS)),
    st.text(alphabet="$abcdef", min_size=2, max_size=6),
    max_size=25,
)
filters = st.builds(
    StateFilter.freeze,
    st.dictionaries(
        st.sampled_from(TYPES + ["m.unknown"]),
        st.one_of(st.none(), st.frozensets(st.sampled_from(KEYS + ["@zz:hs"]), max_size=3)),
        max_size=4,
    ),
    st.booleans(),
)


class ResolvedStateTests(unittest.TestCase):
    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(state=states, state_filter=filters)
    def test_filter_equals_synapse(self, state, state_filter) -> None:
        resolved = ResolvedState(dict(state))
        self.assertEqual(resolved.filter(state_filter), state_filter.filter_state(state))
        # A copy: the cached state is never handed out.
        out = resolved.filter(state_filter)
        out[("mutated", "")] = "$x"
        self.assertNotIn(("mutated", ""), resolved.full)

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(
        base=states,
        changes=st.dictionaries(
            st.tuples(st.sampled_from(TYPES), st.sampled_from(KEYS)),
            st.one_of(st.none(), st.text(alphabet="$abcdef", min_size=2, max_size=6)),
            max_size=10,
        ),
        state_filter=filters,
    )
    def test_changes_filter_equals_synapse(self, base, changes, state_filter) -> None:
        state = dict(base)
        for key, event_id in changes.items():
            if event_id is None:
                state.pop(key, None)
            else:
                state[key] = event_id
        resolved = ResolvedState(dict(base))
        derived = ResolvedChanges(1, dict(changes))
        self.assertEqual(
            derived.filter(resolved, state_filter), state_filter.filter_state(state)
        )
        # Neither the base nor the changes are handed out.
        derived.filter(resolved, state_filter)[("mutated", "")] = "$x"
        self.assertNotIn(("mutated", ""), resolved.full)
        self.assertNotIn(("mutated", ""), derived.changes)

    def test_named_filters(self) -> None:
        state = {(t, k): f"${t}{k}" for t in TYPES for k in KEYS}
        resolved = ResolvedState(state)
        for state_filter in (
            StateFilter.all(),
            StateFilter.none(),
            StateFilter.from_lazy_load_member_list(["@a:hs", "@nobody:hs"]),
            StateFilter.from_types([("m.room.member", None), ("m.room.name", "")]),
        ):
            self.assertEqual(resolved.filter(state_filter), state_filter.filter_state(state))

    def test_members_are_held_once(self) -> None:
        """The index by type that narrow filters read leaves members out: in a
        big room they are almost the whole state, kept once, in ``full``."""
        state = {(t, k): f"${t}{k}" for t in TYPES for k in KEYS}
        resolved = ResolvedState(state)
        for state_filter in (
            StateFilter.from_lazy_load_member_list(["@a:hs"]),
            StateFilter.from_types([("m.room.member", None)]),
            StateFilter.from_types([("m.room.member", "@b:hs"), ("m.room.name", "")]),
        ):
            self.assertEqual(resolved.filter(state_filter), state_filter.filter_state(state))
        self.assertEqual(set(resolved.others), set(TYPES) - {"m.room.member"})

