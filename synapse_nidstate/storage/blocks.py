"""Where a read finds blocks: each state group's snapshot, each snapshot's
block list and the blocks themselves, from the caches that hold them or from
their rows, checked against their content hashes (a row that does not match
is :class:`CorruptState`, never an answer).

The caches are filled only with committed rows (``txn.call_after``, or a
write transaction's ``TxnLearnt`` published after it commits): block lists and
blocks never change once written, a group's snapshot only goes with a purge.

Block lists and blocks are cached flat, as arrays of NIDs (int32s where
they fit), and given out as the tuples the algebra takes: a block list of 30
NIDs is then one object of 216 bytes instead of a tuple and 30 integer
objects (1,120 bytes). A snapshot's block list and its blocks' key ranges
are one cache entry. Reads answered from the
resolved-state and split caches never touch them; a read that resolves blocks
pays the conversion, a few microseconds beside its statements.
"""

import itertools
from array import array
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from synapse.storage.database import LoggingTransaction
from synapse.util.caches.lrucache import LruCache

from synapse_nidstate import algebra
from synapse_nidstate.algebra import Block
from synapse_nidstate.algebra.pieces import check_covers, unpack_piece_checked
from synapse_nidstate.storage.base import NidStoreBase, TxnLearnt
from synapse_nidstate.storage.block_strings import MIN_ENTRIES, NidStrings
from synapse_nidstate.storage.common import CacheMiss, CorruptState, in_list_clause
from synapse_nidstate.storage.flat_blocks import FlatBlocks, block_of, ints, joined
from synapse_nidstate.storage.narrow_statement import key_patterns, narrow_statement

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_nidstate.runtime.config import NidStateConfig

T = TypeVar("T")


def _checked(
    decode: Callable[[bytes, bytes], T], what: str, nid: int, data: bytes, digest: bytes
) -> T:
    """A stored value decoded and checked against its content hash."""
    try:
        return decode(data, digest)
    except algebra.AlgebraError as e:
        raise CorruptState(f"{what} {nid}: {e}") from e


def checked_block_list(snapshot_nid: int, data: bytes, digest: bytes) -> tuple[int, ...]:
    """A snapshot's stored block list, checked against its content hash."""
    return _checked(algebra.unpack_nids_checked, "snapshot", snapshot_nid, data, digest)


#: The key range of a block whose range is not known (not stored, or a NID
#: past the key numbers' reach): every key, so that every read reads it.
EVERY_KEY = (0, algebra.MAX_KEY_NUMBER)


def _snapshot_ranges(
    block_lists: Mapping[int, Sequence[int]],
    blocks: Mapping[int, array],
    ranges: Mapping[int, tuple[int, int]],
) -> dict[int, tuple[Sequence[int], array]]:
    """The key ranges of each snapshot's blocks, in list order, flat (what
    ``BlockStore._snapshot_blocks`` keeps beside the list), of the snapshots
    whose every block has a known range (from its row) or is at hand (its
    entries' range): snapshot -> (its block list, the ranges)."""
    out = {}
    for snapshot_nid, block_nids in block_lists.items():
        listed: list[int] = []
        for b in block_nids:
            if b in ranges:
                listed += ranges[b]
            elif b in blocks:
                listed += algebra.flat_key_range(blocks[b]) or EVERY_KEY
            else:
                break
        else:
            out[snapshot_nid] = (block_nids, array("q", listed))
    return out


#: A snapshot's cached block list, and its blocks' key ranges once known.
Listed = tuple[array, array | None]


class BlockStore(NidStoreBase):
    def __init__(self, hs: "HomeServer", config: "NidStateConfig") -> None:
        super().__init__(hs, config)
        snapshots = config.snapshot_cache_size
        self._group_snapshots: LruCache[int, int] = self._cache("group_snapshots", snapshots)
        #: Each snapshot's block list (int32s where they fit) and, once a
        #: narrow read has seen every block's key range, those ranges in
        #: list order (two key numbers a block): what lets a narrow lookup
        #: answer from the caches without the blocks it does not need. One
        #: entry a snapshot for both (a second cache of ranges took a node a
        #: snapshot more), the ranges set once: an entry a block (a cold
        #: narrow read of a snapshot of 60 blocks set 50) took a third of a
        #: cold narrow read's time at M. Sized by the blocks listed
        #: (``block_list_cache_size``), not by snapshots: an intermediate,
        #: which the answers' caches make unneeded for what they hold, and
        #: with a budget a snapshot, the lists of a replay of the mix at M
        #: took 2.5 MiB for no measurable speed (docs/benchmarks.md, session 28).
        self._snapshot_blocks: LruCache[int, Listed] = self._cache(
            "snapshot_blocks",
            config.block_list_cache_size,
            size_callback=lambda listed: max(1, len(listed[0])),
        )
        # Sized by entries (three NIDs each), as the blocks cache always was.
        self._blocks: LruCache[int, array] = self._cache(
            "blocks", config.block_cache_size, size_callback=lambda flat: len(flat) // 3
        )
        #: A big block's pieces (schema 8, ``algebra.pieces``) a narrow read
        #: took instead of the block: the key range each covers (two key
        #: numbers a piece, in order), and each piece's entries flat, by
        #: (block NID, piece). Sized as the blocks cache, by entries.
        self._piece_covers: LruCache[int, array] = self._cache("piece_covers", snapshots)
        self._pieces: LruCache[tuple[int, int], array] = self._cache(
            "pieces", config.block_cache_size, size_callback=lambda flat: len(flat) // 3
        )
        #: Whether this process has met a big block (one with pieces): until
        #: then a narrow read selects blocks without the join to their pieces,
        #: a statement a database without big blocks (M and smaller: none
        #: over 512 entries) never needs, and which costs it 0.13 ms a read
        #: (0.312 against 0.185 ms, ``benchmarks.statement_shapes``). A big block met meanwhile
        #: is read whole, checked against its hash as any block, and turns it
        #: on; so does writing one. A hint, never needed for an answer.
        self.big_blocks_seen = False

    def _publish(self, learnt: TxnLearnt) -> None:
        super()._publish(learnt)
        for group, snapshot_nid in learnt.groups.items():
            self._group_snapshots.set(group, snapshot_nid)
        for snapshot_nid, block_nids in learnt.snapshots.items():
            # A block list never changes: one cached keeps its ranges.
            if snapshot_nid not in learnt.snapshot_ranges and not self._snapshot_blocks.contains(
                snapshot_nid
            ):
                self._snapshot_blocks.set(snapshot_nid, (ints(block_nids), None))
        for snapshot_nid, (listed_nids, flat) in learnt.snapshot_ranges.items():
            listed = self._snapshot_blocks.get(snapshot_nid, update_metrics=False)
            if listed is None or listed[1] is None:
                self._snapshot_blocks.set(
                    snapshot_nid, (ints(listed_nids) if listed is None else listed[0], flat)
                )
        for block_nid, block in learnt.blocks.items():
            self._blocks.set(block_nid, ints(itertools.chain.from_iterable(block)))
        for block_nid, flat in learnt.flat_blocks.items():
            self._blocks.set(block_nid, flat)
        for block_nid, covers in learnt.piece_covers.items():
            self._piece_covers.set(block_nid, covers)
        for key, flat in learnt.pieces.items():
            self._pieces.set(key, flat)

    def known_groups_txn(
        self,
        txn: LoggingTransaction,
        groups: Collection[int],
        learnt: TxnLearnt | None = None,
    ) -> dict[int, int]:
        """State group -> snapshot NID, for the groups the mirror has.

        In a write transaction pass its ``learnt``: rows it wrote itself must
        not be cached before it commits.
        """
        found, missing = self._split_cached(self._group_snapshots, groups)
        if learnt is not None:
            found.update((g, learnt.groups[g]) for g in missing if g in learnt.groups)
            missing = [g for g in missing if g not in learnt.groups]
        if missing:
            rows = self._select_in_txn(
                txn,
                "SELECT state_group, snapshot_nid FROM nidstate_state_groups WHERE",
                "state_group",
                missing,
            )
            found.update(rows)
            if learnt is None:
                txn.call_after(self._fill, self._group_snapshots, rows)
            else:
                learnt.groups.update(rows)
        return found

    async def known_groups(self, groups: Collection[int]) -> dict[int, int]:
        found, missing = self._split_cached(self._group_snapshots, groups)
        if not missing:
            return found
        found.update(
            await self.db_pool.runInteraction(
                "nidstate_known_groups", self.known_groups_txn, missing
            )
        )
        return found

    def _blocks_txn(
        self,
        txn: LoggingTransaction | None,
        learnt: TxnLearnt,
        block_nids: Collection[int],
        strings: "NidStrings | None" = None,
    ) -> dict[int, Block]:
        """The blocks ``block_nids``, cached or read (a missing row is an
        error; a narrow read takes :meth:`_narrow_blocks_txn` instead). With
        ``strings`` (a whole read), the strings stored beside the blocks read
        go into it, by NID (schema 7; blocks without them add nothing).

        In a transaction it also takes, in the same statement, the stored
        strings of the cached blocks of :data:`MIN_ENTRIES` entries or more
        (the cache keeps NIDs only): else a whole read of a big room whose
        blocks are cached read every entry's strings by NID, 3.5x slower than
        cold at HQ scale (``benchmarks.whole_read``; docs/benchmarks.md)."""
        flat, missing = self._split_cached(self._blocks, block_nids)
        found: dict[int, Block]
        if strings is None:
            found = {nid: block_of(entries) for nid, entries in flat.items()}
        else:
            found = FlatBlocks(flat)
        for b in missing:
            if b in learnt.blocks:
                found[b] = learnt.blocks[b]
            elif b in learnt.flat_blocks:
                found[b] = block_of(learnt.flat_blocks[b])
        missing = self._to_read(txn, learnt, missing, None)
        texts_of: list[int] = []
        if strings is not None:
            texts_of = [b for b, entries in flat.items() if len(entries) >= 3 * MIN_ENTRIES]
            if txn is None and texts_of:
                # From the caches alone, resolved by NID: a miss of a big
                # block's event IDs is a miss before the resolving, not after.
                cached = self._event_ids.cache
                for b in texts_of:
                    if not all(e in cached for e in flat[b][2::3] if e):
                        raise CacheMiss()
                texts_of = []
        if not missing and not texts_of:
            return found
        for nid, data, digest, text in self._block_rows_txn(
            txn, missing, strings is not None, texts_of
        ):
            if data is not None and digest is not None:
                if strings is None:
                    found[nid] = learnt.blocks[nid] = _checked(
                        algebra.unpack_block_checked, "block", nid, data, digest
                    )
                    continue
                flat[nid] = learnt.flat_blocks[nid] = _checked(
                    algebra.unpack_flat_checked, "block", nid, data, digest
                )
            if strings is not None and text is not None:
                strings.add(nid, flat[nid], text)
        return found

    def _narrow_blocks_txn(
        self,
        txn: LoggingTransaction | None,
        learnt: TxnLearnt,
        block_lists: Mapping[int, Sequence[int]],
        key_ranges: Sequence[tuple[int, int]],
        keys: Sequence[tuple[int, int]] | None = None,
    ) -> dict[int, array]:
        """The blocks of the snapshots ``block_lists`` (snapshot -> its block
        list) that a narrow read needs, flat (three NIDs an entry), for
        ``algebra.entries_in_ranges`` to take the few entries the read wants
        without a tuple for each of the others. A block is needed unless its
        key range, cached with its snapshot's or read with its row, meets
        none of ``key_ranges``. Of a big block (schema 8), only the pieces
        whose cover meets them: what is given for it is then those pieces'
        entries, in order, not the block. Once every block's range of a
        snapshot is known, they are cached with it."""
        ranges: dict[int, tuple[int, int]] = {}
        without: dict[int, Sequence[int]] = {}  # snapshots whose ranges are not cached
        for snapshot_nid, block_nids in block_lists.items():
            # (Looked up by the read's block lists already: counted there.)
            listed = self._snapshot_blocks.get(snapshot_nid, update_metrics=False)
            known = None if listed is None else listed[1]
            if known is None:
                without[snapshot_nid] = block_nids
            else:
                ranges.update((b, (known[2 * i], known[2 * i + 1])) for i, b in enumerate(block_nids))
        needed = {b for block_nids in block_lists.values() for b in block_nids}
        found, missing = self._split_cached(self._blocks, needed)
        not_cached = []
        # (A membership test first: a miss through LruCache.get costs a lock
        # and the metrics, for each of a cold read's dozens of blocks.)
        with_covers = self._piece_covers.cache
        for b in missing:
            if b in learnt.flat_blocks:
                found[b] = learnt.flat_blocks[b]
            elif b in learnt.blocks:
                found[b] = ints(itertools.chain.from_iterable(learnt.blocks[b]))
            elif b in with_covers and (pieces := self._cached_pieces(b, key_ranges)) is not None:
                ranges[b], found[b] = pieces
            else:
                not_cached.append(b)
        missing = self._to_read(txn, learnt, not_cached, key_ranges, ranges)
        if missing:
            assert txn is not None
            found.update(self._narrow_rows_txn(txn, learnt, missing, key_ranges, ranges, keys))
        if without:
            # Kept beside the block lists when the read's learnt is published
            # (also a snapshot whose blocks' ranges all came with another's).
            learnt.snapshot_ranges.update(_snapshot_ranges(without, found, ranges))
        return found

    def _cached_pieces(
        self, block_nid: int, key_ranges: Sequence[tuple[int, int]]
    ) -> tuple[tuple[int, int], array] | None:
        """A big block's key range and the entries of its pieces a narrow
        read of ``key_ranges`` needs, from the caches; None unless all are."""
        covers = self._piece_covers.get(block_nid)
        if covers is None:
            return None
        taken = []
        for i in range(len(covers) // 2):
            if algebra.ranges_meet((covers[2 * i], covers[2 * i + 1]), key_ranges):
                piece = self._pieces.get((block_nid, i))
                if piece is None:
                    return None
                taken.append(piece)
        return (covers[0], covers[-1]), joined(taken)

    def _narrow_rows_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        missing: list[int],
        key_ranges: Sequence[tuple[int, int]],
        ranges: dict[int, tuple[int, int]],
        keys: Sequence[tuple[int, int]] | None,
    ) -> dict[int, array]:
        """Of each block of ``missing``, in one statement
        (``storage/narrow_statement.py``): its stored range (into ``ranges``),
        and if it holds a key of ``key_ranges`` its entries, or, for a big
        block, every piece's cover and the slices of those that meet them;
        and on PostgreSQL, for a filter of the exact ``keys``, the event IDs
        of their entries in the blocks (into ``learnt.event_ids``). Every
        block row must be there, and every piece of a big block read (its
        covers tiling the block's range): what is not is ``CorruptState``.

        Until this process has met a big block (:attr:`big_blocks_seen`),
        the statement has no join to the pieces, and a big block that meets
        them is given whole (checked as any block), which turns it on."""
        sql, args = narrow_statement(
            self.engine, missing, key_ranges, self.big_blocks_seen, key_patterns(self.engine, keys)
        )
        self.prepared.execute(txn, "narrow_blocks", sql, args)
        block_rows: dict[int, tuple] = {}
        piece_rows: dict[int, list[tuple]] = {}
        for row in txn.fetchall():
            if row[0]:  # an event ID found beside the blocks (narrow_statement)
                learnt.event_ids[row[1]] = row[12]
                continue
            _, nid, first, last, count, digest, data, piece, p_first, p_last, p_digest, p_count, _ = row
            if count:
                self.big_blocks_seen = True
            if piece is None:
                block_rows[nid] = (nid, first, last, data, digest, count)
            else:
                block_rows[nid] = (nid, first, last, None, digest, count)
                piece_rows.setdefault(nid, []).append((nid, piece, p_first, p_last, data, p_digest, p_count))
        if len(block_rows) != len(missing):
            raise CorruptState(f"state blocks missing: {set(missing) - set(block_rows)}")
        found: dict[int, array] = {}
        for nid, first, last, data, digest, pieces in block_rows.values():
            ranges[nid] = (first, last) if first is not None else EVERY_KEY
            if data is not None:
                found[nid] = _checked(algebra.unpack_flat_checked, "block", nid, data, digest)
                learnt.flat_blocks[nid] = found[nid]
            elif pieces and algebra.ranges_meet(ranges[nid], key_ranges):
                found[nid] = self._from_pieces(
                    learnt, nid, ranges[nid], pieces, sorted(piece_rows.get(nid, ()))
                )
        return found

    @staticmethod
    def _from_pieces(
        learnt: TxnLearnt,
        block_nid: int,
        block_range: tuple[int, int],
        pieces: int,
        rows: list[tuple],
    ) -> array:
        """The entries of a big block's pieces read (``rows``: each piece's
        cover, and its slice where the read needs it), checked: all the
        pieces, tiling the block's range, each slice against its hash."""
        taken = []
        covers = array("q")
        try:
            check_covers(block_range, pieces, [(piece, first, last) for _, piece, first, last, *_ in rows])
            for _, piece, first, last, data, digest, entry_count in rows:
                covers.extend((first, last))
                if data is not None:
                    entries = unpack_piece_checked(data, entry_count, bytes(digest), first, last)
                    learnt.pieces[(block_nid, piece)] = entries
                    taken.append(entries)
        except algebra.AlgebraError as e:
            raise CorruptState(f"block {block_nid}: {e}") from e
        learnt.piece_covers[block_nid] = covers
        return joined(taken)

    def _to_read(
        self,
        txn: LoggingTransaction | None,
        learnt: TxnLearnt,
        missing: list[int],
        key_ranges: Sequence[tuple[int, int]] | None,
        ranges: Mapping[int, tuple[int, int]] | None = None,
    ) -> list[int]:
        """Of the blocks not cached, those a read must select: not learnt in
        this transaction, nor known (``ranges``) to hold no key in ``key_ranges``."""
        missing = [b for b in missing if b not in learnt.blocks and b not in learnt.flat_blocks]
        if missing and key_ranges is not None:
            if not key_ranges:
                return []  # the filter wants no key at all
            if ranges:
                missing = [
                    b for b in missing
                    if b not in ranges or algebra.ranges_meet(ranges[b], key_ranges)
                ]
        if missing and txn is None:
            raise CacheMiss()
        return missing

    def _block_rows_txn(
        self,
        txn: LoggingTransaction | None,
        missing: list[int],
        with_strings: bool,
        texts_of: Sequence[int] = (),
    ) -> list[tuple[int, bytes | None, bytes | None, str | None]]:
        """(block NID, entries, content hash, strings) of each of ``missing``,
        and (block NID, None, None, strings) of each of ``texts_of`` (cached),
        in one statement. A row of ``missing`` not there is ``CorruptState``."""
        assert txn is not None
        parts: list[str] = []
        args: list[Any] = []
        if missing:
            clause, args = in_list_clause(self.engine, "block_nid", missing)
            strings = ", strings" if with_strings else ", NULL"
            parts.append(
                f"SELECT block_nid, entries, content_hash{strings} FROM nidstate_blocks WHERE {clause}"
            )
        if texts_of:
            clause, more = in_list_clause(self.engine, "block_nid", texts_of)
            parts.append(f"SELECT block_nid, NULL, NULL, strings FROM nidstate_blocks WHERE {clause}")
            args += more
        self.prepared.execute(txn, "blocks", " UNION ALL ".join(parts), args)
        rows = txn.fetchall()
        if sum(r[1] is not None for r in rows) != len(missing):
            read = {r[0] for r in rows if r[1] is not None}
            raise CorruptState(f"state blocks missing: {set(missing) - read}")
        return rows

    def _snapshots_txn(
        self,
        txn: LoggingTransaction | None,
        learnt: TxnLearnt,
        snapshot_nids: Collection[int],
    ) -> dict[int, tuple[int, ...]]:
        listed, missing = self._split_cached(self._snapshot_blocks, snapshot_nids)
        found = {nid: tuple(block_nids) for nid, (block_nids, _) in listed.items()}
        missing = [s for s in missing if s not in learnt.snapshots]
        found.update(
            (s, learnt.snapshots[s]) for s in snapshot_nids if s in learnt.snapshots
        )
        if missing:
            if txn is None:
                raise CacheMiss()
            rows = self._select_in_txn(
                txn,
                "SELECT snapshot_nid, block_nids, content_hash FROM nidstate_snapshots WHERE",
                "snapshot_nid",
                missing,
                purpose="block_lists",
            )
            loaded = {nid: checked_block_list(nid, blocks, digest) for nid, blocks, digest in rows}
            if len(loaded) != len(missing):
                raise CorruptState(f"snapshots missing: {set(missing) - set(loaded)}")
            learnt.snapshots.update(loaded)
            found.update(loaded)
        return found
