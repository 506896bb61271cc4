"""`python -m build` makes a wheel and an sdist that install and run, schema included."""

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _built() -> Path:
    """One build for every test here (it takes half a minute); its output folder."""
    out = Path(tempfile.mkdtemp(prefix="nidstate-build-"))
    atexit.register(shutil.rmtree, out, True)  # shared by the tests: removed at exit
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        raise AssertionError(f"python -m build failed: {build.stdout[-2000:]}{build.stderr[-2000:]}")
    return out


class PackagingTests(unittest.TestCase):
    timeout = 600

    def setUp(self) -> None:
        self.out = _built()

    def test_wheel_installs_and_runs(self) -> None:
        (wheel,) = self.out.glob("*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        for engine in ("sqlite", "postgres"):
            self.assertIn(f"synapse_nidstate/storage/sql/{engine}/01_core.sql", names)
        target = self.out / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--target", str(target), str(wheel)],
            check=True,
        )
        # The installed copy, not the checkout: its schema files and its CLI.
        env = {**os.environ, "PYTHONPATH": str(target)}
        probe = subprocess.run(
            [sys.executable, "-c",
             "import synapse_nidstate, synapse_nidstate.storage.schema as s;"
             "from synapse.storage.engines import create_engine;"
             "e = create_engine({'name': 'sqlite3', 'args': {'database': ':memory:'}});"
             "print(synapse_nidstate.__file__); print(len(s.schema_files(e)))"],
            cwd=self.out, env=env, capture_output=True, text=True,
        )
        self.assertEqual(probe.returncode, 0, probe.stderr)
        path, files = probe.stdout.split()
        self.assertTrue(path.startswith(str(target)), path)
        self.assertGreaterEqual(int(files), 2)
        cli = subprocess.run(
            [sys.executable, "-m", "synapse_nidstate.cli", "--help"],
            cwd=self.out, env=env, capture_output=True, text=True,
        )
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertIn("migrate", cli.stdout)

    def test_sdist_holds_what_the_tests_and_operators_need(self) -> None:
        (sdist,) = self.out.glob("*.tar.gz")
        names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
        for needed in (
            "pyproject.toml",
            "README.md",
            "CHANGELOG.md",
            "tox.ini",
            "sql/postgres/01_core.sql",
            "sql/sqlite/01_core.sql",
            "tests/harness.py",
            "conformance/run.py",
            "contrib/grafana/nidstate.json",
            "contrib/prometheus/nidstate-alerts.yml",
        ):
            self.assertIn(needed, names)
