"""Synapse's own test suite with synapse-nidstate loaded into every test homeserver.

    python conformance/run.py [--engine sqlite|postgres] [--mode serve|shadow]
                              [--eager] [--tests NAME ...] [--synapse-tests DIR]
                              [--baseline all|failed] [--sequential] [--jobs N]

1. Takes Synapse's ``tests`` package from the source distribution of the
   installed matrix-synapse release (``pip download --no-binary :all:`` stops
   when it tries to build the package's metadata, which needs Rust, but
   ``--no-clean`` leaves the unpacked source: ``tests/`` is plain Python). It is
   kept in ``.conformance/`` for the next run.
2. Runs the selected tests (``selection.py``) with the module in every
   homeserver (``site/sitecustomize.py``) and without it, in two processes at
   once. With ``--baseline failed`` (what CI uses, to halve the work on two
   cores) the run without the module takes only the tests that failed with it:
   the failures the module adds are the same either way.
3. Reports the failures the module adds (failing with it, not without it), the
   module's counters summed over the run (state-at-event lookups, state-group
   reads, the mirror), and fails when the module adds a failure, served nothing
   (``serve``) or compared nothing (``shadow``) of either kind, or anything
   mismatched or failed to write. The last line is ``N passed, M failed``
   (M: failures the module adds). A test listed in ``selection.KNOWN_DIFFERENCES``
   (it observes what serve changes: Synapse's per-group caches left empty, a
   transaction fewer) is reported apart where its entry applies, and is a
   problem if it passes there (stale). With ``--eager`` (mode serve) every state
   group is reclaimed in the transaction that persists its event, so Synapse's
   tests run with an (almost) empty ``state_groups_state``; the run then also
   fails if nothing was reclaimed or a group was refused.

Exit codes: 0 all good, 1 a failure as above, 2 bad input or set-up.
"""

import argparse
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE.parent / ".conformance"
sys.path.insert(0, str(HERE))
from selection import KNOWN_DIFFERENCES, SELECTION  # noqa: E402

#: A line of trial's ``bwverbose`` reporter: the test's full name and its result.
_TAGS = r"(OK|FAILURE|FAIL|ERROR|SKIPPED|TODO|SUCCESS!?!?|EXPECTED FAILURE|UNEXPECTED SUCCESS)"
_RESULT = re.compile(r"^(\S+) \.\.\.(.*)$")
_LATE_RESULT = re.compile(r"\[" + _TAGS + r"\]\s*$")
_FAILED = {"FAIL", "FAILURE", "ERROR", "UNEXPECTED SUCCESS"}


class SetupError(Exception):
    """The job cannot run (no source distribution, no database...)."""


def synapse_tests(version: str) -> Path:
    """A folder holding Synapse's ``tests`` package of ``version`` (and nothing else)."""
    root = CACHE / f"synapse-{version}"
    if (root / "tests" / "unittest.py").exists():
        return root
    tmp = CACHE / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Metadata generation fails (no Rust); the unpacked source stays under TMPDIR.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
         "--no-deps", "--no-clean", "-d", str(tmp / "dl"), f"matrix-synapse=={version}"],
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        check=False,
    )
    found = glob.glob(str(tmp / "pip-*" / "matrix-synapse*" / "tests" / "unittest.py"))
    if not found:
        raise SetupError(
            f"could not unpack matrix-synapse {version}'s source distribution "
            "(pip download --no-binary :all:); is PyPI reachable?"
        )
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(found[0]).parent, root / "tests")
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def available(tests_root: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """The names this release has, and those it does not."""
    have: list[str] = []
    missing: list[str] = []
    for name in names:
        path = tests_root.joinpath(*name.split("."))
        (have if path.with_suffix(".py").exists() or path.is_dir() else missing).append(name)
    return have, missing


def start_run(
    tests_root: Path,
    names: list[str],
    engine: str,
    mode: str | None,
    work: Path,
    eager: bool = False,
    jobs: int = 1,
) -> tuple[subprocess.Popen, Path, Path]:
    """Start trial on ``names``; ``mode`` None runs without the module."""
    label = mode or "without"
    run_dir = work / label
    run_dir.mkdir()
    counters = run_dir / "counters"
    counters.mkdir()
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("NIDSTATE_CONFORMANCE_", "SYNAPSE_POSTGRES"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "site"), str(tests_root)])
    if mode:
        env["NIDSTATE_CONFORMANCE_MODE"] = mode
        env["NIDSTATE_CONFORMANCE_COUNTERS"] = str(counters)
        if eager:
            env["NIDSTATE_CONFORMANCE_EAGER"] = "1"
    if engine == "postgres":
        env["SYNAPSE_POSTGRES"] = "1"
        env.setdefault("SYNAPSE_POSTGRES_HOST", os.environ.get("NIDSTATE_TEST_PG_HOST", "127.0.0.1"))
        env.setdefault("SYNAPSE_POSTGRES_PORT", os.environ.get("NIDSTATE_TEST_PG_PORT", "5432"))
        env.setdefault("SYNAPSE_POSTGRES_USER", os.environ.get("NIDSTATE_TEST_PG_USER", "postgres"))
    output = run_dir / "trial.out"
    process = subprocess.Popen(
        [sys.executable, "-m", "twisted.trial", "--reporter=bwverbose",
         *([f"--jobs={jobs}"] if jobs > 1 else []), *names],
        cwd=run_dir,  # trial's _trial_temp goes here; our own tests/ is not on the path
        env=env,
        stdout=output.open("w"),
        stderr=subprocess.STDOUT,
    )
    return process, output, counters


#: Seconds a trial process may take to exit once it has printed its summary.
EXIT_GRACE = 120

_SUMMARY = re.compile(r"^(PASSED|FAILED) \(")


def finish(process: subprocess.Popen, output: Path) -> None:
    """Wait for a trial process. One that printed its summary but does not exit
    (a test left a non-daemon thread behind: seen with Synapse 1.157's own tests on
    PostgreSQL) is ended after EXIT_GRACE seconds; its counters are written before
    the interpreter waits for threads, and its results are all in its output."""
    summary_seen: float | None = None
    while process.poll() is None:
        time.sleep(2)
        if summary_seen is None:
            if any(_SUMMARY.match(line) for line in output.read_text(errors="replace").splitlines()[-3:]):
                summary_seen = time.monotonic()
        elif time.monotonic() - summary_seen > EXIT_GRACE:
            print(f"conformance: trial printed its summary but did not exit; ended ({output})")
            process.terminate()
            process.wait()


def summed_counters(folder: Path) -> dict[str, dict[str, int]]:
    """The counters every test process wrote (one file each), summed."""
    totals: dict[str, dict[str, int]] = {}
    for path in sorted(folder.glob("counters-*.json")):
        for part, values in json.loads(path.read_text()).items():
            into = totals.setdefault(part, {})
            for name, value in values.items():
                into[name] = into.get(name, 0) + value
    return totals


def results(output: Path) -> dict[str, str]:
    """Test name -> result, from trial's output. A test that writes to standard
    output or error pushes its result to a later line: it is matched there."""
    found: dict[str, str] = {}
    pending: str | None = None
    for line in output.read_text(errors="replace").splitlines():
        m = _RESULT.match(line)
        if m and "." in m.group(1):
            tag = _LATE_RESULT.search(m.group(2))
            if tag:
                found[m.group(1)] = tag.group(1)
                pending = None
            else:
                pending = m.group(1)
            continue
        late = _LATE_RESULT.search(line)
        if pending is not None and late:
            found[pending] = late.group(1)
            pending = None
    return found


def expected_count(tests_root: Path, names: list[str]) -> int | None:
    """How many tests ``names`` hold (trial's dry run), None if it cannot tell."""
    env = {**os.environ, "PYTHONPATH": str(tests_root)}
    dry = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "-n", *names],
        cwd=tests_root, env=env, capture_output=True, text=True, timeout=600,
    )
    m = re.search(r"^Ran (\d+) tests?", dry.stdout, re.MULTILINE)
    return int(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="conformance/run.py",
        description="Run Synapse's own tests with and without synapse-nidstate and "
        "report the failures the module adds.",
    )
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--mode", choices=("serve", "shadow"), default="serve")
    parser.add_argument(
        "--eager", action="store_true",
        help="reclaim every state group as its event is persisted (mode serve)",
    )
    parser.add_argument(
        "--tests", nargs="+", metavar="NAME",
        help="trial names of Synapse's tests (default: the selection in conformance/selection.py)",
    )
    parser.add_argument(
        "--synapse-tests", metavar="DIR", type=Path,
        help="a folder holding Synapse's tests/ package (default: from the installed "
        "release's source distribution, kept in .conformance/)",
    )
    parser.add_argument(
        "--baseline", choices=("all", "failed"), default="all",
        help="run every test without the module (all, the default), or only "
        "those that failed with it (failed)",
    )
    parser.add_argument(
        "--sequential", action="store_true",
        help="run without and with the module one after the other (default: at once)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="trial worker processes per run (trial --jobs; on PostgreSQL a test mostly "
        "waits for its database to be created from Synapse's template)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument(
        "--fetch-only", action="store_true",
        help="only unpack Synapse's tests into .conformance/ (before parallel runs)",
    )
    args = parser.parse_args(argv)
    if args.eager and args.mode != "serve":
        parser.error("--eager needs --mode serve")

    version = importlib.metadata.version("matrix-synapse")
    try:
        tests_root = args.synapse_tests or synapse_tests(version)
    except SetupError as e:
        print(f"conformance: {e}", file=sys.stderr)
        return 2
    if not (tests_root / "tests" / "unittest.py").exists():
        print(f"conformance: no Synapse tests/ package in {tests_root}", file=sys.stderr)
        return 2
    if args.fetch_only:
        print(f"conformance: Synapse {version}'s tests are in {tests_root / 'tests'}")
        return 0
    names, missing = available(tests_root, args.tests or [name for name, _ in SELECTION])
    for name in missing:
        print(f"conformance: matrix-synapse {version} has no {name}; skipped")
    if not names:
        print("conformance: no test to run", file=sys.stderr)
        return 2

    print(
        f"conformance: matrix-synapse {version}, {args.engine}, mode {args.mode}"
        f"{' (eager reclaim)' if args.eager else ''}, "
        f"{len(names)} test modules: {' '.join(names)}",
        flush=True,
    )
    expected = expected_count(tests_root, names)
    work = Path(tempfile.mkdtemp(prefix="nidstate-conformance-"))
    started = time.monotonic()
    runs = {}
    if args.baseline == "all":
        for mode in (None, args.mode):
            runs[mode] = start_run(
                tests_root, names, args.engine, mode, work, args.eager, args.jobs
            )
            if args.sequential:
                runs[mode][0].wait()
    else:
        runs[args.mode] = start_run(
            tests_root, names, args.engine, args.mode, work, args.eager, args.jobs
        )
        finish(*runs[args.mode][:2])
        failed = sorted(t for t, r in results(runs[args.mode][1]).items() if r in _FAILED)
        if failed:
            runs[None] = start_run(tests_root, failed, args.engine, None, work, jobs=args.jobs)
    for process, output, _ in runs.values():
        finish(process, output)
    seconds = time.monotonic() - started

    with_module = results(runs[args.mode][1])
    without = results(runs[None][1]) if None in runs else {}
    counters = summed_counters(runs[args.mode][2])
    failed_without = {t for t, r in without.items() if r in _FAILED}
    failed_with = {t for t, r in with_module.items() if r in _FAILED}
    added = sorted(failed_with - failed_without)
    # Tests that observe what serve changes (selection.KNOWN_DIFFERENCES).
    applies = {
        test for test, (when, _) in KNOWN_DIFFERENCES.items()
        if args.mode == "serve" and (when == "serve" or args.eager)
    }
    by_design = [t for t in added if t in applies]
    added = [t for t in added if t not in applies]
    passed = sum(1 for r in with_module.values() if r in ("OK", "SUCCESS"))
    skipped = sum(1 for r in with_module.values() if r == "SKIPPED")

    lookups = counters.get("lookups", {})
    group_reads = counters.get("group_reads", {})
    mirror = counters.get("mirror", {})
    reclaim = counters.get("reclaim", {})
    print(
        f"ran {len(with_module)} tests with the module, {len(without)} without "
        f"(baseline: {args.baseline}), in {seconds:.0f}s"
    )
    print(f"without the module: {len(failed_without)} failed")
    print(f"with the module:    {len(failed_with)} failed, {skipped} skipped")
    print(f"homeservers with the module: {counters.get('homeservers', {}).get('with_module', 0)}")
    print("lookups: " + ", ".join(f"{k} {v}" for k, v in lookups.items()))
    print("group reads: " + ", ".join(f"{k} {v}" for k, v in group_reads.items()))
    print("mirror: " + ", ".join(f"{k} {v}" for k, v in mirror.items()))
    print("reclaim: " + ", ".join(f"{k} {v}" for k, v in reclaim.items()))
    problems = []
    if len(with_module) == 0:
        problems.append(f"the run with the module executed no test (see {work})")
    if expected is not None and len(with_module) != expected:
        problems.append(
            f"{len(with_module)} results with the module for {expected} tests (see {work})"
        )
    if args.baseline == "all" and len(with_module) != len(without):
        problems.append(f"the runs differ in tests run ({len(without)} vs {len(with_module)})")
    for test in added:
        problems.append(f"added failure: {test} ({with_module[test]})")
    for test in by_design:
        print(f"known difference: {test}: {KNOWN_DIFFERENCES[test][1]}")
    for test, result in with_module.items():
        if test in applies and result not in _FAILED:
            problems.append(f"{test} passes with the module: its KNOWN_DIFFERENCES entry is stale")
    for what, counts in (("lookup", lookups), ("state-group read", group_reads)):
        if args.mode == "serve" and not counts.get("served"):
            problems.append(f"no {what} was served by the module")
        if args.mode == "shadow" and not counts.get("compared"):
            problems.append(f"no {what} was compared")
        if counts.get("mismatched"):
            problems.append(f"{counts['mismatched']} {what}s mismatched")
    for what in ("write_failures", "plan_failures"):
        if mirror.get(what):
            problems.append(f"mirror {what}: {mirror[what]}")
    if args.eager:
        if not reclaim.get("groups_reclaimed"):
            problems.append("no state group was reclaimed")
        if reclaim.get("groups_refused"):
            problems.append(f"{reclaim['groups_refused']} state groups refused by reclaim")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print(f"outputs: {work}/without/trial.out, {work}/{args.mode}/trial.out")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "synapse": version, "engine": args.engine, "mode": args.mode,
            "eager": args.eager, "tests": names,
            "seconds": round(seconds), "expected": expected,
            "run_with": len(with_module), "run_without": len(without),
            "failed_without": sorted(failed_without), "failed_with": sorted(failed_with),
            "added_failures": added, "known_differences": by_design,
            "counters": counters, "problems": problems,
        }, indent=2))
    print(f"{passed} passed, {len(added)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
