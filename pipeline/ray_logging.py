"""Ray's driver-side log lines that are not news to this tool's users, for every stage that starts Ray.

``ray.init`` logs "Token authentication is enabled for this Ray cluster…" at every start of a
local cluster and at every connection from a host that has a token but no ``RAY_AUTH_MODE``:
token authentication is the default this tool keeps on, so the line says nothing. It stays off
the console unless ``--verbose``; errors from the same logger still show.
"""

from __future__ import annotations

import logging

TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_token_notice(verbose: bool = False) -> None:
    """Keep Ray's token-authentication notice off the console (``verbose``: let it through)."""
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.INFO if verbose else logging.ERROR)
