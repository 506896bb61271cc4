"""Tests of synapse-nidstate against a real Synapse (run with `python -m twisted.trial tests`)."""

import logging
import os
import tempfile

# Synapse logs a lot; keep it in a file beside trial's own log, not on the console.
_log_dir = os.environ.get("NIDSTATE_TEST_LOG_DIR", tempfile.gettempdir())
_handler = logging.FileHandler(os.path.join(_log_dir, "synapse-nidstate-tests.log"), mode="w")
_handler.setFormatter(
    logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
)
logging.getLogger().addHandler(_handler)
logging.getLogger().setLevel(os.environ.get("NIDSTATE_TEST_LOG_LEVEL", "INFO"))
