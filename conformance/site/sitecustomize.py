"""Loads synapse-nidstate into every homeserver of Synapse's own test suite.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; the
conformance job (``conformance/run.py``) puts this folder there for the test
processes it starts. With ``NIDSTATE_CONFORMANCE_MODE`` unset nothing happens
(the run without the module). With it set:

- every config Synapse parses (``HomeServerConfig.parse_config_dict``, which
  Synapse's ``setup_test_homeserver`` and its real start-up both call) gets the
  module, in that mode (with ``NIDSTATE_CONFORMANCE_EAGER`` set, and eager
  reclaim), unless the config already names it;
- every module instance's counters are kept, and summed into a JSON file in
  the folder ``NIDSTATE_CONFORMANCE_COUNTERS`` names when the process exits
  (one file per process: ``trial -j`` runs tests in several).
"""

import atexit
import json
import os
import threading

MODE = os.environ.get("NIDSTATE_CONFORMANCE_MODE")
EAGER = bool(os.environ.get("NIDSTATE_CONFORMANCE_EAGER"))
COUNTERS = os.environ.get("NIDSTATE_CONFORMANCE_COUNTERS")
MODULE = "synapse_nidstate.NidStateModule"


def _install(mode: str, counters_path: str | None, eager: bool) -> None:
    from synapse.config.homeserver import HomeServerConfig

    from synapse_nidstate.runtime.metrics import NidStateStats
    from synapse_nidstate.runtime.module import NidStateModule

    parse = HomeServerConfig.parse_config_dict

    def parse_config_dict(self, config_dict, *args, **kwargs):  # type: ignore[no-untyped-def]
        modules = list(config_dict.get("modules") or [])
        if not any(m.get("module") == MODULE for m in modules):
            config: dict = {"mode": mode}
            if eager:
                config["reclaim"] = {"eager": True}
            modules.append({"module": MODULE, "config": config})
            config_dict = {**config_dict, "modules": modules}
        return parse(self, config_dict, *args, **kwargs)

    HomeServerConfig.parse_config_dict = parse_config_dict  # type: ignore[method-assign]

    every: list[NidStateStats] = []
    init = NidStateModule.__init__

    def __init__(self, config, api):  # type: ignore[no-untyped-def]
        init(self, config, api)
        every.append(self.stats)

    NidStateModule.__init__ = __init__  # type: ignore[method-assign]

    def write() -> None:
        totals: dict[str, dict[str, int]] = {}
        for stats in every:
            for part, values in stats.as_dict().items():
                into = totals.setdefault(part, {})
                for name, value in values.items():
                    if name != "lag_stream_positions":  # a gauge, not a count
                        into[name] = into.get(name, 0) + value
        totals["homeservers"] = {"with_module": len(every)}
        if counters_path:
            with open(os.path.join(counters_path, f"counters-{os.getpid()}.json"), "w") as f:
                json.dump(totals, f)

    # Before the interpreter waits for non-daemon threads (a test may leave one,
    # and the process then never reaches atexit), and at exit as well.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(write)
    atexit.register(write)


if MODE:
    _install(MODE, COUNTERS, EAGER)
