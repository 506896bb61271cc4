"""The module's admin-only HTTP endpoint: ``GET /_synapse/nidstate/v1/status``.

Served by every Synapse process the module is loaded into (main and workers),
on each of its HTTP listeners, like any module web resource; the counters are
that process's own. Access follows Synapse's Admin API: a request without an
access token gets 401 ``M_MISSING_TOKEN``, a user who is not a server admin 403
``M_FORBIDDEN``, errors in Synapse's JSON format.
"""

from typing import TYPE_CHECKING, Any

from synapse.api.errors import AuthError, Codes
from synapse.module_api import DirectServeJsonResource, ModuleApi

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_nidstate.runtime.module import NidStateModule

STATUS_PATH = "/_synapse/nidstate/v1/status"


class StatusResource(DirectServeJsonResource):
    """The module's mode, schema version, counters and migration progress, as JSON."""

    def __init__(self, api: ModuleApi, module: "NidStateModule") -> None:
        hs = api._hs
        # The homeserver's own clock (DirectServeJsonResource would otherwise
        # build one that is not tied to this homeserver's shutdown).
        super().__init__(clock=hs.get_clock())
        self._api = api
        # Synapse's Auth decides who is an admin, as for its own Admin API:
        # with delegated auth (MAS) that is the token's admin scope, which
        # ModuleApi.is_user_admin (the users table only) would not see.
        self._auth = hs.get_auth()
        self._module = module

    async def _async_render_GET(self, request: "SynapseRequest") -> tuple[int, Any]:
        # Raises MissingClientTokenError (401 M_MISSING_TOKEN) or
        # InvalidClientTokenError (401 M_UNKNOWN_TOKEN) on its own.
        requester = await self._api.get_user_by_req(request)
        if not await self._auth.is_server_admin(requester):
            raise AuthError(403, "You are not a server admin", Codes.FORBIDDEN)
        return 200, await status(self._module)


async def status(module: "NidStateModule") -> dict[str, Any]:
    """The answer of the status endpoint, for ``module`` (this process's instance)."""
    migration = await module.migration_status()
    return {
        "mode": module.config.mode,
        "schema_version": module.schema_version,
        "persists_events": module.persists_events,
        "serves_group_reads": module.serves_group_reads,
        "counters": module.stats.as_dict(),
        "migration": migration,
        "reclaim": await module.reclaim_status(),
    }


def register(api: ModuleApi, module: "NidStateModule") -> None:
    """Serve the status endpoint; call from the module's constructor (before the listeners start)."""
    api.register_web_resource(STATUS_PATH, StatusResource(api, module))
