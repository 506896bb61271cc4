"""`synapse-nidstate reclaim` and `restore`: give Synapse's state rows back to
the disk, and take them back."""

import argparse
from typing import TYPE_CHECKING

from synapse_nidstate.commands.homeserver import CommandInputError, module_config_of, nid_store
from synapse_nidstate.commands.stats import SPACE_BACK
from synapse_nidstate.commands.ui import WorkProgress
from synapse_nidstate.runtime.metrics import ReclaimStats
from synapse_nidstate.runtime.reclaim import Reclaimer
from synapse_nidstate.storage.reclaim import ReclaimError
from synapse_nidstate.storage.schema import engine_name

if TYPE_CHECKING:
    from synapse.server import HomeServer

def _reclaimer(hs: "HomeServer", batch_size: int) -> Reclaimer:
    return Reclaimer(hs, nid_store(hs), ReclaimStats(), batch_size)


async def _check_room(hs: "HomeServer", room_id: str | None) -> None:
    if room_id is None:
        return
    room = await hs.get_datastores().main.get_room(room_id)
    if room is None:
        raise CommandInputError(f"no room {room_id} on this server")


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
    await _check_room(hs, args.room)
    total = await reclaimer.remaining(args.room)
    progress = WorkProgress(
        "proving" if args.dry_run else "reclaiming", total, enabled=not args.no_progress
    )
    totals = await reclaimer.run(args.room, progress, dry_run=args.dry_run)
    progress.finish()
    engine = engine_name(hs.get_datastores().main.database_engine)
    if args.dry_run:
        print(
            f"dry run: {totals.groups} state groups would be reclaimed ({totals.rows} rows of "
            f"state_groups_state), {totals.refused} would keep their rows; nothing was deleted"
        )
    else:
        groups, rows = await reclaimer.database_totals()
        print(
            f"reclaimed {totals.groups} state groups ({totals.rows} rows of state_groups_state) "
            f"in {progress.elapsed():.1f}s; {totals.refused} kept their rows (their proof "
            f"failed: see the log, run verify). In all {groups} groups are reclaimed, "
            f"{rows} rows deleted. {SPACE_BACK[engine]}."
        )
    return 1 if totals.refused else 0


async def restore(hs: "HomeServer", args: argparse.Namespace) -> int:
    reclaimer = _reclaimer(hs, args.batch_size)
    await _check_room(hs, args.room)
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
        else f"{left} groups are still reclaimed (other rooms)"
    )
    print(
        f"restored {totals.groups} state groups ({totals.rows} rows of state_groups_state) "
        f"in {progress.elapsed():.1f}s; {tail}"
    )
    return 0
