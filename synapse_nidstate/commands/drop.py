"""`synapse-nidstate drop`: remove every table of the module."""

import argparse
import sys
from typing import TYPE_CHECKING

from synapse_nidstate.storage.reclaim import reclaimed_totals_txn
from synapse_nidstate.storage.schema import TABLES, current_version_txn, drop_tables_txn

#: The schema version that added reclaim's table.
RECLAIM_SCHEMA = 3

if TYPE_CHECKING:
    from synapse.server import HomeServer


async def drop(hs: "HomeServer", args: argparse.Namespace) -> int:
    db_pool = hs.get_datastores().main.db_pool
    if await db_pool.runInteraction("nidstate_schema_version", current_version_txn) == 0:
        print("no synapse-nidstate tables in this database")
        return 0
    version = await db_pool.runInteraction("nidstate_schema_version", current_version_txn)
    if version >= RECLAIM_SCHEMA:
        groups, rows = await db_pool.runInteraction(
            "nidstate_reclaimed_totals", reclaimed_totals_txn
        )
        if groups:
            print(
                f"synapse-nidstate: refusing to drop: {groups} state groups are reclaimed "
                f"({rows} rows of state_groups_state deleted); the NID tables are their only "
                "copy. Run `synapse-nidstate restore` first.",
                file=sys.stderr,
            )
            return 1
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                "synapse-nidstate: refusing to drop without --yes (standard input is not a "
                "terminal to ask on)",
                file=sys.stderr,
            )
            return 2
        answer = input(
            f"Drop every synapse-nidstate table ({', '.join(TABLES)}) from "
            f"{hs.hostname}'s database? Synapse's own tables are not touched. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing dropped")
            return 1

    await db_pool.runInteraction("nidstate_drop", drop_tables_txn)
    print(
        f"dropped {len(TABLES)} tables. Remove the module from homeserver.yaml, or it "
        "creates them again at the next start (then run migrate to catch up)."
    )
    return 0
