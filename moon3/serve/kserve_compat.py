"""Import KServe without letting it read our command line.

``kserve`` imports ``kserve.model_server``, which parses ``sys.argv`` at import (``parse_known_args`` with prefix
matching, so ``moon3 serve --model X`` would set its ``--model_name``). Every moon3 module that needs KServe
imports it from here, never directly: the first import runs with ``sys.argv`` cut to the program name, so KServe
sees only its defaults and moon3 passes every setting explicitly.
"""

from __future__ import annotations

import sys

_saved_argv = sys.argv
sys.argv = sys.argv[:1]
try:
    import kserve
    import kserve.errors
    import kserve.model_server
    import kserve.protocol.dataplane
    import kserve.protocol.rest.server
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
finally:
    sys.argv = _saved_argv

DataPlane = kserve.protocol.dataplane.DataPlane
RESTServer = kserve.protocol.rest.server.RESTServer

__all__ = ["FASTAPI_APP_IMPORT_STRING", "DataPlane", "RESTServer", "kserve"]
