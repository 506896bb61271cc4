"""The conformance runner's reading of trial's output: every test's result,
also ``[FAILURE]`` (what trial's bwverbose prints for a failed assertion), and
when the test wrote to standard output or error in the middle of its line."""

import importlib.util
from pathlib import Path

from twisted.trial import unittest

from tests.harness import temporary_directory

_RUN = Path(__file__).parent.parent / "conformance" / "run.py"


def _runner():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("nidstate_conformance_run", _RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ResultsTests(unittest.TestCase):
    def test_results_pushed_to_a_later_line_are_found(self) -> None:
        output = Path(temporary_directory(self, "nidstate-conformance-runner-")) / "trial.out"
        output.write_text(
            "tests.storage.test_state\n"
            "  StateStoreTestCase\n"
            "tests.a.B.test_plain ... [OK]\n"
            "tests.a.B.test_printed ... something printed\n"
            "and more [OK]\n"
            "tests.a.B.test_failed ... [FAIL]\n"
            "tests.a.B.test_warned ...\n"
            "/x.py:1: DeprecationWarning: old\n"
            "  warnings.warn(\n"
            "[SKIPPED]\n"
            "tests.a.B.test_error ...                                  [ERROR]\n"
            "tests.a.B.test_failure ... [FAILURE]\n"
        )
        self.assertEqual(
            _runner().results(output),
            {
                "tests.a.B.test_plain": "OK",
                "tests.a.B.test_printed": "OK",
                "tests.a.B.test_failed": "FAIL",
                "tests.a.B.test_warned": "SKIPPED",
                "tests.a.B.test_error": "ERROR",
                "tests.a.B.test_failure": "FAILURE",
            },
        )
