"""Benchmarks of synapse-nidstate against Synapse's own state groups (docs/benchmarks.md)."""

import os

#: The repository's root (the benchmarks' kept data lives under it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
