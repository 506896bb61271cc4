"""synapse-nidstate: Dendrite-style numeric-ID state storage for Synapse.

Enable with ``modules: - module: synapse_nidstate.NidStateModule`` in
``homeserver.yaml``; see the README for the configuration keys.

``NidStateModule`` is imported when Synapse asks for it (PEP 562), not with
the package: the command line (``synapse_nidstate.cli``) then starts without
importing Synapse, so that a Ctrl-C in its first seconds reaches its handler
(one line, exit code 130) instead of interrupting an import with a traceback.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synapse_nidstate.runtime.module import NidStateModule

__all__ = ["NidStateModule"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "NidStateModule":
        from synapse_nidstate.runtime.module import NidStateModule

        return NidStateModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
