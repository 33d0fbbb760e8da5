"""The OpenAPI document tells the truth about the running server (schemathesis, over real HTTP).

Schemathesis generates requests from ``/openapi.json`` of a real engine (every optional router
mounted, an admin key on every request) and checks each answer: no 5xx, a documented status code,
a documented content type, a body matching the documented schema. The run is bounded (a few examples
per operation, no shrinking) and deterministic (``--generation-deterministic``), so a failure
reproduces; it runs the ``st`` CLI in a subprocess so the engine keeps serving on this test's loop.

Not checked: ``positive_data_acceptance``. Some refusals depend on state no schema can carry
(a template or webhook that does not exist, a cursor this engine did not issue, a host that does
not resolve to a public address); the schema states every rule it can (shapes, patterns, the
configured streams), and those refusals are documented 404/422 answers.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = f"""
[templates]
directory = "{REPO / 'templates'}"

[tracking]
base_url = "https://t.example.test"

[[tracking.keys]]
id = 3
secret = "{'c' * 48}"
"""
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def _st() -> str:
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        found = shutil.which("st")
        if found is None:
            pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
        return found
    return str(st)


@pytest.mark.timeout(240)  # ~40 s on a loaded 2-core machine; the margin is for worse load, not for more examples
async def test_schemathesis_finds_nothing(engine_factory, tmp_path) -> None:
    eng = await engine_factory(CONFIG)
    key, _ = await eng.apikeys.create("conformance", ["admin"])
    host, port = eng.http_address
    args = [
        _st(), "run", f"http://{host}:{port}/openapi.json",
        "--header", f"Authorization: Bearer {key}",
        "--checks", CHECKS,
        "--phases", "examples,fuzzing",
        "--max-examples", "4",
        "--generation-deterministic", "--no-shrink",
        "--workers", "1", "--request-timeout", "30",
        "--no-color", "--output-truncate", "false",
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,  # its state dir in tmp
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=220)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-20000:]
    assert "Operations:" in report and " 0 selected" not in report


async def test_405_lists_every_method_of_the_path(engine_factory) -> None:
    """``Allow`` on a 405 names every documented method of the path, not only the first route's."""
    eng = await engine_factory(CONFIG)
    host, port = eng.http_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as http:
        spec: dict[str, Any] = (await http.get("/openapi.json")).json()
        checked = 0
        for path, item in spec["paths"].items():
            documented = {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
            url = path.replace("{", "x").replace("}", "")
            r = await http.request("PUT" if "PUT" not in documented else "OPTIONS", url)
            assert r.status_code == 405, (path, r.status_code, r.text)
            assert set(r.json()) >= {"error", "field"}, (path, r.text)
            assert set(r.headers["allow"].replace(" ", "").split(",")) == documented, (path, r.headers["allow"])
            assert set(r.json()) >= {"error", "field"}, r.text
            checked += 1
        assert checked > 20
