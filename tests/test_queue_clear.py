"""Clearing the pending queue (DELETE /api/queue): the editor's "clear pending" button."""

from __future__ import annotations

import uuid


def sleep_wf(label: str, steps: int = 1, step_seconds: float = 0.0) -> dict:
    return {
        "version": 1,
        "nodes": {
            "1": {"type": "Sleep", "inputs": {"steps": steps, "step_seconds": step_seconds, "label": label}}
        },
    }


def test_clear_pending_cancels_only_the_callers_pending_prompts(idle_api):
    api = idle_api
    tag = uuid.uuid4().hex[:8]
    gate = api.submit(sleep_wf(f"gate-{tag}", steps=3000, step_seconds=0.01), client_id=f"a-{tag}")
    api.wait_status(gate, ("running",))
    mine = [api.submit(sleep_wf(f"mine-{tag}-{i}"), client_id=f"a-{tag}") for i in range(2)]
    theirs = api.submit(sleep_wf(f"theirs-{tag}"), client_id=f"b-{tag}")

    r = api.request("DELETE", f"/api/queue?client_id=a-{tag}")
    assert r.status == 200 and sorted(r.json()["cancelled"]) == sorted(mine)
    queue = api.get_json("/api/queue")
    assert [i["prompt_id"] for i in queue["running"]] == [gate]  # the running prompt stays
    assert [i["prompt_id"] for i in queue["pending"]] == [theirs]

    r = api.request("DELETE", "/api/queue")
    assert r.status == 200 and r.json() == {"cancelled": [theirs]}
    api.request("POST", "/api/interrupt", json_body={})
    api.wait_idle()
    assert {api.entry(p)["status"] for p in (*mine, theirs)} == {"cancelled"}
    assert not any(line.startswith(("start mine", "start theirs")) for line in api.sleep_log())


def test_a_client_cannot_cancel_another_clients_prompt(idle_api):
    api = idle_api
    tag = uuid.uuid4().hex[:8]
    gate = api.submit(sleep_wf(f"gate-{tag}", steps=3000, step_seconds=0.01), client_id=f"a-{tag}")
    api.wait_status(gate, ("running",))
    theirs = api.submit(sleep_wf(f"theirs-{tag}"), client_id=f"b-{tag}")
    r = api.request("DELETE", f"/api/queue/{theirs}?client_id=a-{tag}")
    assert r.status == 403 and "another client" in r.json()["error"]
    assert api.entry(theirs)["status"] == "pending"
    assert api.request("DELETE", f"/api/queue/{theirs}?client_id=b-{tag}").status == 200
    api.request("POST", "/api/interrupt", json_body={})
    api.wait_idle()
