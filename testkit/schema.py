"""The committed OpenAPI schema and the script that writes and checks it (scripts/openapi-schema)."""

from __future__ import annotations

import subprocess
import sys

from testkit.cog_server import PROJECT_ROOT

SCHEMA = PROJECT_ROOT / ".cog" / "openapi_schema.json"


def schema_script(*args, cwd=PROJECT_ROOT):
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "openapi-schema"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
