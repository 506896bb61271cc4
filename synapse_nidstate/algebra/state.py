"""Blocks, snapshots, deltas and compaction: the state calculus over NIDs.

Pure Python, no database and no Synapse (see ``types`` for the vocabulary).
"""

import functools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import attr

from synapse_nidstate.algebra.types import (
    COMPACTED_BLOCKS_TARGET,
    KEY_NID_LIMIT,
    MAX_BLOCKS,
    MAX_KEY_NUMBER,
    MIN_CHUNK_ENTRIES,
    AlgebraError,
    Block,
    Entry,
    NidStateMap,
    StateKeyNids,
)

K = TypeVar("K")
V = TypeVar("V")


def make_block(entries: Iterable[Entry]) -> Block:
    """Build a block: sorted by key, one entry per key.

    Raises AlgebraError if a key is given twice or a NID is not positive.
    """
    block = tuple(sorted(entries))
    previous: StateKeyNids | None = None
    for type_nid, state_key_nid, event_nid in block:
        if type_nid <= 0 or state_key_nid <= 0 or event_nid < 0:
            raise AlgebraError(
                f"bad entry {(type_nid, state_key_nid, event_nid)} in block"
            )
        if previous == (type_nid, state_key_nid):
            raise AlgebraError(f"key {previous} twice in one block")
        previous = (type_nid, state_key_nid)
    return block


def resolve(blocks: Iterable[Block]) -> NidStateMap:
    """The state a sequence of blocks stands for: later blocks win, tombstones drop."""
    return {key: event_nid for key, event_nid in changes(blocks).items() if event_nid}


def changes(blocks: Iterable[Block]) -> NidStateMap:
    """What appending ``blocks`` to a snapshot does to its state: later blocks
    win, a tombstone (event NID 0) kept as 0. ``resolve(parent + blocks)`` is
    ``resolve(parent)`` updated with this, the zeros then dropped."""
    state: NidStateMap = {}
    for block in blocks:
        for type_nid, state_key_nid, event_nid in block:
            state[(type_nid, state_key_nid)] = event_nid
    return state


def lookup(blocks: Sequence[Block], keys: Iterable[StateKeyNids]) -> NidStateMap:
    """Resolve only ``keys``: binary search each block, newest block first.

    Equal to ``{k: v for k, v in resolve(blocks).items() if k in keys}`` but
    touches O(len(keys) * len(blocks) * log(block size)) entries.
    """
    wanted = set(keys)
    found: NidStateMap = {}
    for block in reversed(blocks):
        if not wanted:
            break
        for key in list(wanted):
            i = bisect_left(block, key)
            if i < len(block) and block[i][:2] == key:
                wanted.discard(key)
                if block[i][2]:
                    found[key] = block[i][2]
    return found


@functools.lru_cache(maxsize=64)
def _key_bounds(
    ranges: tuple[tuple[int, int], ...],
) -> list[tuple[tuple[int, int], tuple[float, ...]]]:
    """Each range of key numbers as the entries' keys compare: its first key,
    and a bound past its last (past every state key of its type at a type's
    end, past everything at the very end). Worked out once for the blocks of
    a read, which share their filter's ranges."""
    bounds = []
    for lo, hi in ranges:
        hi_type, hi_key = divmod(hi, KEY_NID_LIMIT)
        hi_bound: tuple[float, ...] = (
            (math.inf,)
            if hi == MAX_KEY_NUMBER
            else (hi_type, math.inf)
            if hi_key == KEY_NID_LIMIT - 1
            else (hi_type, hi_key)
        )
        bounds.append((divmod(lo, KEY_NID_LIMIT), hi_bound))
    return bounds


def entries_in_ranges(flat: Sequence[int], ranges: Sequence[tuple[int, int]]) -> Block:
    """The entries of a block, given flat (its NIDs, three an entry, sorted
    by key: the stored and cached form), whose key lies in one of ``ranges``
    (``NidFilter.key_ranges``: closed ranges of key numbers, sorted and
    disjoint). Only the ranges that meet the block's first and last keys are
    searched, two binary searches each, and a range holding both takes the
    block whole; a tuple only for the entries kept: a narrow read of a
    compaction's chunk of thousands of entries keeps a few, and of a
    lazy-loading filter's seven ranges a chunk of members meets one or two.
    For the filter whose ranges they are, ``apply`` of the entries kept
    equals ``apply`` of the whole blocks (no key it wants is outside).

    A range's end on a type's last key number (``KEY_NID_LIMIT - 1``) takes
    every state key of that type, NIDs beyond the key numbers' reach too."""
    count = len(flat) // 3
    if not count:
        return ()
    first, last = (flat[0], flat[1]), (flat[-3], flat[-2])

    def key(i: int) -> tuple[int, int]:
        return flat[3 * i], flat[3 * i + 1]

    kept: list[tuple[int, int, int]] = []
    everything = range(count)
    for lo_key, hi_bound in _key_bounds(tuple(ranges)):
        if lo_key > last or hi_bound < first:
            continue
        if lo_key <= first and last <= hi_bound:
            start, end = 0, count
        else:
            start = bisect_left(everything, lo_key, key=key)
            end = bisect_right(everything, hi_bound, key=key)
        kept.extend(
            (flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]) for i in range(start, end)
        )
    return tuple(kept)


def delta(base: Mapping[StateKeyNids, int], new: Mapping[StateKeyNids, int]) -> Block:
    """The block that turns state ``base`` into state ``new`` when appended.

    Keys in ``base`` but not in ``new`` become tombstones.
    """
    entries = [(t, s, e) for (t, s), e in new.items() if base.get((t, s)) != e]
    entries.extend((t, s, 0) for (t, s) in base.keys() - new.keys())
    return make_block(entries)


def key_number(key: StateKeyNids) -> int:
    """``key`` as one number (see :data:`KEY_NID_LIMIT`)."""
    return key[0] * KEY_NID_LIMIT + key[1]


def block_key_range(block: Block) -> tuple[int, int] | None:
    """The smallest and largest key number in ``block`` (its entries are sorted
    by key), or None when it is empty or a NID does not fit a key number: its
    range is then unknown, and every lookup reads it."""
    if not block or any(t >= KEY_NID_LIMIT or s >= KEY_NID_LIMIT for t, s, _ in block):
        return None
    return key_number(block[0][:2]), key_number(block[-1][:2])


def flat_key_range(flat: Sequence[int]) -> tuple[int, int] | None:
    """:func:`block_key_range` of a block given flat (three NIDs an entry,
    sorted by key: the stored and cached form)."""
    # Sorted by key: the last entry's type NID is the largest.
    if not flat or flat[-3] >= KEY_NID_LIMIT or max(flat[1::3]) >= KEY_NID_LIMIT:
        return None
    return key_number((flat[0], flat[1])), key_number((flat[-3], flat[-2]))


def ranges_meet(key_range: tuple[int, int], ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether the closed range ``key_range`` meets one of ``ranges``."""
    first, last = key_range
    return any(lo <= last and first <= hi for lo, hi in ranges)


def _is_boundary(key: StateKeyNids, modulus: int) -> bool:
    # A cheap deterministic integer hash (splitmix64 finaliser) of the key.
    x = (key[0] * 0x9E3779B97F4A7C15 + key[1]) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x % modulus == 0


def compact(state: Mapping[StateKeyNids, int]) -> list[Block]:
    """Cut a full state into deterministic, content-defined blocks.

    Entries are sorted by key and a block ends after every key whose hash hits
    a boundary (content-defined chunking with no minimum size, so a cut never
    depends on where the previous one fell). The expected block size, a power
    of two at least :data:`MIN_CHUNK_ENTRIES`, grows with the state so that the
    result stays near :data:`COMPACTED_BLOCKS_TARGET` blocks. Two compactions
    of states that differ in a few keys and use the same block size share every
    block those keys do not fall in, and storage dedupes the shared ones; when
    the state doubles past a power of two the block size doubles and every
    block is new once (so O(log n) times over a room's life). Never more than
    ``MAX_BLOCKS // 2`` blocks; an empty state gives no block.
    """
    entries = make_block((t, s, e) for (t, s), e in state.items() if e)
    if not entries:
        return []
    modulus = MIN_CHUNK_ENTRIES
    while modulus * COMPACTED_BLOCKS_TARGET < len(entries):
        modulus *= 2
    blocks: list[Block] = []
    start = 0
    for i, entry in enumerate(entries):
        if _is_boundary(entry[:2], modulus):
            blocks.append(entries[start : i + 1])
            start = i + 1
    if start < len(entries):
        blocks.append(entries[start:])
    # Unlucky hashes can cut too often; merge neighbours pairwise (still
    # deterministic) until the snapshot has room for deltas again.
    while len(blocks) > MAX_BLOCKS // 2:
        blocks = [
            blocks[i] + blocks[i + 1] if i + 1 < len(blocks) else blocks[i]
            for i in range(0, len(blocks), 2)
        ]
    return blocks


@attr.s(slots=True, frozen=True, auto_attribs=True)
class SnapshotPlan:
    """How to store a new state: ``blocks`` to write, in snapshot order.

    ``base`` is the NIDs of the blocks kept from the parent snapshot (a prefix of
    the new snapshot); ``blocks`` are the new blocks appended after them.
    ``compacted``: the whole state was cut into full-state blocks (a full state
    with no parent, or a parent at the 64-block limit whose blocks could not be
    merged, see :func:`merge_point`).
    """

    base: tuple[int, ...]
    blocks: tuple[Block, ...]
    compacted: bool


def merge_point(sizes: Sequence[int], change: int) -> int | None:
    """Where a snapshot at the block limit merges its last blocks, or None.

    ``sizes``: the entries of each of its blocks; ``change``: of the block
    appended. The blocks from index ``j`` on, with the change, are merged
    (into pieces cut where the blocks before ``j`` end, see :func:`extend`),
    for the smallest ``j`` (at most ``MAX_BLOCKS // 2``) whose blocks hold no
    more entries than the blocks before ``j`` do on average; the next merge is
    at least ``MAX_BLOCKS // 4`` appends away. A snapshot after a compaction
    is its blocks (a sixteenth of the state each, about) and one small block
    per change, so that merge is as cheap as the changes since the
    compaction, and a compaction comes only when they add up to a compacted
    block's size, instead of at every 64th change (each a whole state resolved, cut, hashed
    and mostly written again). In a small room, whose blocks are all small,
    there is no such ``j``: the state is compacted, as it is cheap there.
    """
    tail = sum(sizes) + change
    kept = 0
    for j in range(1, min(len(sizes), MAX_BLOCKS // 2) + 1):
        tail -= sizes[j - 1]
        kept += sizes[j - 1]
        if tail * j <= kept:
            return j
    return None


def _split_like(entries: Sequence[Entry], kept: Sequence[Block]) -> tuple[Block, ...]:
    """Sorted ``entries`` cut where the ``kept`` blocks end (after a
    compaction, its chunks: each piece then holds the keys of one chunk, and
    a narrow read that needs one chunk needs one piece), pieces merged in
    pairs while there are more than leave :data:`MAX_BLOCKS` // 4 appends
    before the limit."""
    cuts = sorted({block[-1][:2] for block in kept if block})
    pieces: dict[int, list[Entry]] = {}
    for entry in entries:
        pieces.setdefault(bisect_left(cuts, entry[:2]), []).append(entry)
    out = [tuple(pieces[i]) for i in sorted(pieces)]
    most = max(1, MAX_BLOCKS - MAX_BLOCKS // 4 - len(kept))
    while len(out) > most:
        out = [
            out[i] + out[i + 1] if i + 1 < len(out) else out[i] for i in range(0, len(out), 2)
        ]
    return tuple(out)


def extend(
    parent_blocks: Sequence[int],
    change: Block,
    load_parent: Callable[[], Sequence[Block]],
) -> SnapshotPlan:
    """Plan the snapshot of ``parent`` with ``change`` applied.

    While the parent has fewer than :data:`MAX_BLOCKS` blocks the new snapshot
    is the parent's blocks plus one delta block. At the limit its last blocks
    and the change are merged (:func:`merge_point`; a tombstone is kept
    there, as the blocks before may hold its key), cut where the blocks kept
    end so that each piece spans one of their key ranges; where they cannot
    be, the full state is compacted. ``load_parent`` (the parent's blocks, in
    order) is only called at the limit.
    """
    if not change:
        return SnapshotPlan(tuple(parent_blocks), (), False)
    if len(parent_blocks) < MAX_BLOCKS:
        return SnapshotPlan(tuple(parent_blocks), (change,), False)
    blocks = load_parent()
    j = merge_point([len(b) for b in blocks], len(change))
    if j is not None:
        merged = changes([*blocks[j:], change])
        entries = [(t, s, e) for (t, s), e in sorted(merged.items())]
        return SnapshotPlan(tuple(parent_blocks[:j]), _split_like(entries, blocks[:j]), False)
    state = resolve(blocks)
    for type_nid, state_key_nid, event_nid in change:
        state[(type_nid, state_key_nid)] = event_nid
    return SnapshotPlan((), tuple(compact(state)), True)


def full(state: Mapping[StateKeyNids, int]) -> SnapshotPlan:
    """Plan a snapshot from a full state with no parent."""
    return SnapshotPlan((), tuple(compact(state)), True)


#: :func:`rebase` keeps a full state as a delta on a similar snapshot while the
#: delta has at most one entry in this many of the state's.
REBASE_PART = 8


def rebase(
    base_blocks: Sequence[int], base: Sequence[Block], state: Mapping[StateKeyNids, int]
) -> SnapshotPlan:
    """Plan a snapshot from a full state and a similar snapshot's (``base``:
    its block NIDs and its blocks).

    A full state that differs little from a snapshot already stored (Synapse
    stores a group in full every 100 hops of a delta chain, although it is its
    predecessor's state with one event's change) is that snapshot's blocks plus
    one delta block, as :func:`extend` would give from the change, instead of a
    compaction of its own; beyond :data:`REBASE_PART`, it is compacted (:func:`full`).
    """
    change = delta(resolve(base), state)
    if len(change) * REBASE_PART > max(len(state), REBASE_PART):
        return full(state)
    return extend(base_blocks, change, lambda: base)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class NidFilter:
    """A Synapse ``StateFilter`` translated to NIDs.

    ``types`` maps a type NID to the state key NIDs wanted (``None``: every key).
    With ``include_others`` every type not in ``types`` is wanted too. Strings
    that have no NID cannot be in any state, so the translation drops them; that
    is why a filter naming only unknown keys matches nothing.
    """

    types: Mapping[int, frozenset[int] | None]
    include_others: bool

    def is_full(self) -> bool:
        return self.include_others and not self.types

    def matches(self, key: StateKeyNids) -> bool:
        if key[0] not in self.types:
            return self.include_others
        keys = self.types[key[0]]
        return keys is None or key[1] in keys

    def concrete_keys(self) -> list[StateKeyNids] | None:
        """The exact keys wanted, or None if the filter has wildcards or others."""
        if self.include_others or any(k is None for k in self.types.values()):
            return None
        return [(t, s) for t, keys in self.types.items() for s in keys or ()]

    def key_ranges(self, most: int = 64) -> list[tuple[int, int]] | None:
        """Closed ranges of key numbers that hold every key the filter wants,
        sorted and disjoint; only blocks whose key range meets one of them can
        change the answer. None when that is every block: a full filter, a NID
        that does not fit a key number, or more than ``most`` ranges."""
        if self.is_full():
            return None
        ranges: list[tuple[int, int]] = []
        low = 0  # where the gap before the next listed type starts
        for type_nid in sorted(self.types):
            keys = self.types[type_nid]
            if type_nid >= KEY_NID_LIMIT or any(k >= KEY_NID_LIMIT for k in keys or ()):
                return None
            base = type_nid * KEY_NID_LIMIT
            if self.include_others and low < base:
                ranges.append((low, base - 1))
            if keys is None:
                ranges.append((base, base + KEY_NID_LIMIT - 1))
            else:
                ranges.extend((base + k, base + k) for k in sorted(keys))
            low = base + KEY_NID_LIMIT
        if self.include_others:
            ranges.append((low, MAX_KEY_NUMBER))
        merged: list[tuple[int, int]] = []
        for lo, hi in ranges:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return merged if len(merged) <= most else None

    def apply(self, blocks: Sequence[Block]) -> NidStateMap:
        """Resolve ``blocks`` and keep what the filter wants."""
        keys = self.concrete_keys()
        if keys is not None:
            return lookup(blocks, keys)
        state = resolve(blocks)
        if self.is_full():
            return state
        return {key: e for key, e in state.items() if self.matches(key)}


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading block NIDs two block lists share."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def bounded_difference(
    state: Mapping[K, V], base: Mapping[K, V], most: int
) -> dict[K, V | None] | None:
    """What turns ``base`` into ``state`` (a key ``state`` lacks: None), or
    None if that is more than ``most`` keys (given up as soon as it is).
    No value of either is None."""
    changes: dict[K, V | None] = {}
    added = 0
    for key, value in state.items():
        theirs = base.get(key)
        if theirs != value:
            if theirs is None:
                added += 1
            changes[key] = value
            if len(changes) > most:
                return None
    removed = len(base) - (len(state) - added)
    if removed:
        if len(changes) + removed > most:
            return None
        changes.update((key, None) for key in base if key not in state)
    return changes
