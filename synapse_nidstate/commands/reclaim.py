"""`synapse-nidstate reclaim` and `restore`: give Synapse's state rows back to
the disk, and take them back."""

import argparse
from typing import TYPE_CHECKING

from synapse_nidstate.commands.homeserver import (
    CommandInputError,
    check_room_exists,
    module_config_of,
    nid_store,
)
from synapse_nidstate.commands.stats import SPACE_BACK
from synapse_nidstate.commands.storage_figures import format_bytes, room_names, table_figures
from synapse_nidstate.commands.ui import WorkProgress, counted
from synapse_nidstate.commands.ui import table as table_text
from synapse_nidstate.runtime.metrics import ReclaimStats
from synapse_nidstate.runtime.reclaim import Reclaimer, Totals
from synapse_nidstate.storage.reclaim import ReclaimError
from synapse_nidstate.storage.schema import engine_name

if TYPE_CHECKING:
    from synapse.server import HomeServer

def _reclaimer(hs: "HomeServer", batch_size: int) -> Reclaimer:
    return Reclaimer(hs, nid_store(hs), ReclaimStats(), batch_size)


async def reclaim(hs: "HomeServer", args: argparse.Namespace) -> int:
    config = module_config_of(hs)
    if config is None or config.mode != "serve":
        mode = "not loaded" if config is None else f"mode {config.mode!r}"
        raise CommandInputError(
            "reclaim needs synapse_nidstate.NidStateModule in homeserver.yaml with mode: "
            f"serve (it is {mode}): Synapse must read reclaimed groups from the NID tables"
        )
    reclaimer = _reclaimer(hs, args.batch_size)
    try:
        reclaimer.check_possible()
    except RuntimeError as e:
        raise CommandInputError(str(e)) from None
    await check_room_exists(hs, args.room)
    total = await reclaimer.remaining(args.room)
    progress = WorkProgress(
        "proving" if args.dry_run else "reclaiming", total, enabled=not args.no_progress
    )
    totals = await reclaimer.run(args.room, progress, dry_run=args.dry_run)
    progress.finish()
    engine = engine_name(hs.get_datastores().main.database_engine)
    refused = (
        f"; {counted(totals.refused, 'group')} "
        + ("would keep" if args.dry_run else "kept")
        + " their rows (their proof failed: see the log, run verify)"
        if totals.refused
        else ""
    )
    if args.dry_run:
        print(
            f"dry run: {counted(totals.groups, 'state group')} would be reclaimed "
            f"({counted(totals.rows, 'row')} of state_groups_state){refused}; nothing was deleted"
        )
        await _what_would_come_back(hs, totals, progress.elapsed())
    else:
        groups, rows = await reclaimer.database_totals()
        print(
            f"reclaimed {counted(totals.groups, 'state group')} "
            f"({counted(totals.rows, 'row')} of state_groups_state) in "
            f"{progress.elapsed():.1f}s{refused}. In all {counted(groups, 'group')} reclaimed, "
            f"{counted(rows, 'row')} deleted. {SPACE_BACK[engine]}."
        )
    return 1 if totals.refused else 0


#: Rooms listed by a dry run's estimate.
TOP_ROOMS = 5


async def _what_would_come_back(hs: "HomeServer", totals: Totals, seconds: float) -> None:
    """A dry run's estimate: the bytes the rows would give back (their share of
    ``state_groups_state`` and its indexes, measured as ``stats`` measures the
    table), overall and for the rooms with the most rows, and how long it takes."""
    state = hs.get_datastores().state.db_pool
    table = await table_figures(state, "state_groups_state", "state")
    if table.total_bytes is None or not table.rows:
        print("the bytes it would give back cannot be measured on this database")
        return
    per_row = table.total_bytes / table.rows

    def share(rows: int) -> str:
        return format_bytes(rows * per_row)

    print(
        f"it would give back about {share(totals.rows)}: those rows' share of "
        f"state_groups_state ({format_bytes(table.total_bytes)} with its indexes, "
        f"{counted(table.rows, 'row')}, measured as `stats` measures it)"
    )
    top = sorted(totals.rows_by_room.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ROOMS]
    if top:
        names = await room_names(hs.get_datastores().main.db_pool, [r for r, _ in top])
        print(
            table_text(
                [
                    (room_id, names.get(room_id, (None, None))[0] or "",
                     f"{rows:,}", share(rows))
                    for room_id, rows in top
                ],
                ("room", "name", "rows", "about"),
                title="the rooms with the most rows to give back",
            )
        )
    rate = (totals.groups + totals.refused) / seconds if seconds > 0 else 0.0
    print(
        f"the proof took {seconds:.1f}s ({rate:,.0f} groups/s); reclaim proves the same "
        "way and then deletes, so expect about as long"
    )


async def restore(hs: "HomeServer", args: argparse.Namespace) -> int:
    reclaimer = _reclaimer(hs, args.batch_size)
    await check_room_exists(hs, args.room)
    total = await reclaimer.reclaimed(args.room)
    progress = WorkProgress("restoring", total, enabled=not args.no_progress)
    try:
        totals = await reclaimer.restore(args.room, progress)
    except ReclaimError as e:
        progress.finish()
        print(f"synapse-nidstate: restore stopped: {e}")
        return 1
    progress.finish()
    left, _ = await reclaimer.database_totals()
    tail = (
        "no group is reclaimed any more: Synapse runs without the module again"
        if left == 0
        else f"{counted(left, 'group is', 'groups are')} still reclaimed (other rooms)"
    )
    print(
        f"restored {counted(totals.groups, 'state group')} "
        f"({counted(totals.rows, 'row')} of state_groups_state) in {progress.elapsed():.1f}s; "
        f"{tail}"
    )
    return 0
