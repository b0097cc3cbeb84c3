"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document (schemathesis).

About 25 generated requests per operation against a server on 127.0.0.1; it passes only with
no server error (5xx), no status code the document does not list, 405 with a correct `Allow`
for methods a path lacks, and the documented content types.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CHECKS = "not_a_server_error,status_code_conformance,unsupported_method,allow_header_conformance,content_type_conformance"


def schemathesis_cli() -> str:
    """The `st` command of the interpreter running the tests (schemathesis is in the `test` extra)."""
    beside = Path(sys.executable).with_name("st")
    found = str(beside) if beside.exists() else shutil.which("st")
    assert found, "schemathesis is not installed: pip install -e '.[test]'"
    return found


def test_fuzzed_requests_get_no_server_error_and_only_documented_codes(server):
    api = server("schemathesis")
    proc = subprocess.run(
        [
            schemathesis_cli(),
            "run",
            f"{api.url}/api/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--seed",
            "14",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--generation-database",
            "none",
            "--no-color",
            "--warnings",
            "off",
            "--request-timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=api.root,
    )
    summary = proc.stdout[proc.stdout.find("SUMMARY") :] if "SUMMARY" in proc.stdout else proc.stdout[-4000:]
    assert proc.returncode == 0, f"{summary}\n{proc.stderr[-2000:]}"
    assert "No issues found" in proc.stdout
    tested = next(line for line in proc.stdout.splitlines() if line.strip().startswith("Tested:"))
    assert int(tested.split(":")[1]) >= 19  # every route in the document was exercised
