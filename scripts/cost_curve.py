"""The cost curve: every operator command, timed, on histories of several sizes.

    cd scripts && python cost_curve.py NAME=HOMESERVER_YAML [NAME=HOMESERVER_YAML ...] \\
        [--verify-sample 10000] [--json FILE]

For each homeserver.yaml (the module configured in mode ``serve``; e.g. those
``python -m benchmarks.run --dataset-only`` writes, ``homeserver-nid.yaml``, or
``hq_scale.py``'s), in order, the real ``synapse-nidstate`` commands, each a
process of its own, its wall time and peak RSS (the kernel's, ``os.wait4``):

1. ``drop`` then ``migrate``: the whole history mirrored from nothing;
2. ``verify --sample N``;
3. ``reclaim``, then ``VACUUM FULL state_groups_state``;
4. ``restore``.

With the rows and bytes of Synapse's state tables and of the module's
(``stats --json``) before reclaim, after it (and the vacuum) and after
restore. The report puts the histories side by side and, from the largest
one, what the per-row costs predict for a server of ``--predict-rows`` rows
of ``state_groups_state`` (Matrix HQ's: 1.06 billion): times scale with the
rows, memory does not (each command holds a batch, and the batch follows the
biggest room's state, not the history's length); the prediction says so.

It changes the databases it is given (the module's tables are dropped and
rebuilt, groups reclaimed and restored); Synapse's answers are unchanged at
the end (``migration_at_scale.py --reclaim`` checks that on digests). Run it
where nothing else is running: the figures are timings.
"""

import argparse
import json
import os
import re
import sys
from typing import Any

import yaml
from migration_at_scale import count, run_measured, stats_json, vacuum

from synapse_nidstate.commands.ui import table

#: Rows of state_groups_state of a server the size of Matrix HQ's (the
#: figure the project's issues give for it).
HQ_ROWS = 1_060_000_000


#: How each command prints the time of its work (without the process's
#: start-up: imports, and Synapse's homeserver set up in-process).
OWN_TIME = {
    "migrate": r"events in [0-9,]+ batch(?:es)?, ([0-9.]+)s",
    "reclaim": r"rows of state_groups_state\) in ([0-9.]+)s",
    "restore": r"rows of state_groups_state\) in ([0-9.]+)s",
}


def command(config: str, name: str, *args: str) -> dict[str, Any]:
    """One CLI command's wall time, the time of its work where it prints it,
    its peak RSS and last output lines; exits on failure."""
    flag = "--yes" if name == "drop" else "--no-progress"
    out, seconds, rss_kib, _ = run_measured([name, "-c", config, flag, *args])
    if "Traceback" in out:
        sys.exit(f"{name} failed on {config}:\n{out[-2000:]}")
    own = re.search(OWN_TIME[name], out) if name in OWN_TIME else None
    print(f"  {name}: {seconds:.1f} s, peak RSS {rss_kib / 1024:.0f} MiB; {out[-300:]!r}", flush=True)
    return {
        "seconds": seconds,
        "work_seconds": float(own.group(1)) if own else None,
        "peak_rss_mib": rss_kib / 1024,
        "output": out[-1000:],
    }


def footprint(config: str) -> dict[str, int]:
    report = stats_json(config)
    synapse, module = report["synapse"], report["nidstate"]
    return {
        "rows": synapse["tables"]["state_groups_state"]["rows"],
        "synapse_bytes": synapse["total_bytes"],
        "module_bytes": module["total_bytes"],
    }


def run_one(name: str, config: str, verify_sample: int) -> dict[str, Any]:
    with open(config) as f:
        database = yaml.safe_load(f)["database"]
    print(f"{name}: {config}", flush=True)
    result: dict[str, Any] = {"config": config}
    result["events"] = count(database, "SELECT COUNT(*) FROM event_to_state_groups")
    result["groups"] = count(database, "SELECT COUNT(*) FROM state_groups")
    command(config, "drop")
    result["migrate"] = command(config, "migrate")
    result["verify"] = command(config, "verify", "--sample", str(verify_sample))
    if not re.search(r"mismatches: 0\b", result["verify"]["output"]):
        sys.exit(f"verify found mismatches on {config}")
    result["before"] = footprint(config)
    result["reclaim"] = command(config, "reclaim")
    vacuum(database)
    result["reclaimed"] = footprint(config)
    result["restore"] = command(config, "restore")
    result["restored"] = footprint(config)
    return result


def report(runs: dict[str, dict[str, Any]], predict_rows: int) -> str:
    commands = ("migrate", "verify", "reclaim", "restore")
    names = list(runs)
    rows: list[list[Any]] = [
        ["events with state", *(f"{r['events']:,}" for r in runs.values())],
        ["state groups", *(f"{r['groups']:,}" for r in runs.values())],
        ["rows of state_groups_state", *(f"{r['before']['rows']:,}" for r in runs.values())],
    ]
    for c in commands:
        rows.append([f"{c}: s (the process)", *(f"{r[c]['seconds']:.1f}" for r in runs.values())])
        if c in OWN_TIME:
            rows.append([f"{c}: s (its work)", *(f"{r[c]['work_seconds']:.1f}" for r in runs.values())])
        rows.append([f"{c}: peak RSS MiB", *(f"{r[c]['peak_rss_mib']:.0f}" for r in runs.values())])
    mib = 1024 * 1024
    rows += [
        ["Synapse's state tables before, MiB",
         *(f"{r['before']['synapse_bytes'] / mib:.1f}" for r in runs.values())],
        ["the module's tables, MiB", *(f"{r['before']['module_bytes'] / mib:.1f}" for r in runs.values())],
        ["rows left after reclaim", *(f"{r['reclaimed']['rows']:,}" for r in runs.values())],
        ["footprint after reclaim and VACUUM / before",
         *(f"{(r['reclaimed']['synapse_bytes'] + r['reclaimed']['module_bytes']) / r['before']['synapse_bytes']:.3f}"
           for r in runs.values())],
        ["rows after restore <= before",
         *(str(r["restored"]["rows"] <= r["before"]["rows"]) for r in runs.values())],
    ]
    out = [table(rows, ["", *names], "the cost curve")]
    largest = max(runs.values(), key=lambda r: r["before"]["rows"])
    scale = predict_rows / largest["before"]["rows"]
    predicted = [
        [c, f"{largest[c]['work_seconds'] * scale / 3600:,.1f} h",
         f"{largest[c]['work_seconds'] / largest['before']['rows'] * 1e6:.1f} s"]
        for c in OWN_TIME
    ]
    out.append(table(
        predicted,
        ["command", f"predicted for {predict_rows:,} rows", "per million rows"],
        f"the commands' work, linear in the rows, from the largest run "
        f"({largest['before']['rows']:,} rows; verify --sample takes a fixed number of "
        f"events, and memory follows the biggest room, not the rows)",
    ))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=HOMESERVER_YAML")
    parser.add_argument("--verify-sample", type=int, default=10000)
    parser.add_argument("--predict-rows", type=int, default=HQ_ROWS)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    configs = {}
    for run in args.runs:
        name, sep, path = run.partition("=")
        if not sep or not os.path.exists(path):
            parser.error(f"{run!r}: expected NAME=HOMESERVER_YAML with an existing file")
        configs[name] = path
    runs = {name: run_one(name, path, args.verify_sample) for name, path in configs.items()}
    print(report(runs, args.predict_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
