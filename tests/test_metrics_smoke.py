"""/metrics in one engine process: parsed with prometheus_client's own parser after real work."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_submissions_and_read_the_queue(engine_factory) -> None:
    eng = await engine_factory('[webhooks]\nenabled = false\n')
    key, _ = await eng.apikeys.create("k", ["send"])
    base = f"http://{eng.http_address[0]}:{eng.http_address[1]}"
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
        before = _samples((await http.get("/metrics")).text)
        for _ in range(3):
            r = await http.post("/v1/messages", json={"from": "a@sender.test", "to": ["x@example.net", "y@example.net"],
                                                      "subject": "s", "text": "t"})
            assert r.status_code == 202
        r = await http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        after = _samples(r.text)
    k = ("engine_messages_received_total", (("source", "http"),))
    assert after[k] - before.get(k, 0.0) == 3
    assert after[("engine_queue_depth", (("state", "queued"), ("stream", "default")))] == 6
    assert after[("engine_queue_ready", (("stream", "default"),))] == 6
    assert after[("engine_submit_latency_seconds_count", (("source", "http"),))] >= 3
