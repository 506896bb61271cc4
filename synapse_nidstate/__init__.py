"""synapse-nidstate: Dendrite-style numeric-ID state storage for Synapse.

Enable with ``modules: - module: synapse_nidstate.NidStateModule`` in
``homeserver.yaml``; see the README for the configuration keys.
"""

from synapse_nidstate.runtime.module import NidStateModule

__all__ = ["NidStateModule"]
__version__ = "0.1.0"
