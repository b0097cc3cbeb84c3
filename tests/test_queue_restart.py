"""Nothing accepted is lost: the queue and history survive a hard kill and a graceful stop."""

from __future__ import annotations

import sqlite3

from tessera_harness import wait_until


def sleep_wf(label: str, steps: int = 1, step_seconds: float = 0.0, gate: str = "") -> dict:
    inputs = {"steps": steps, "step_seconds": step_seconds, "label": label, "gate": gate}
    return {"version": 1, "nodes": {"1": {"type": "Sleep", "inputs": inputs}}}


def stored_statuses(server) -> dict[str, str]:
    """The queue database exactly as the stopped process left it (read-only)."""
    db = sqlite3.connect(f"file:{server.user_dir / 'queue.sqlite'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT prompt_id, status FROM prompts"))
    finally:
        db.close()


def test_queue_and_history_survive_sigkill_and_graceful_stop(restart_server):
    s = restart_server
    finished = s.submit(sleep_wf("finished"))
    first = s.wait_status(finished)
    assert first["status"] == "success"

    gate = s.root / "let-long-finish"  # the long prompt cannot finish before this file exists
    running = s.submit(sleep_wf("long", gate=str(gate)))
    pending = [s.submit(sleep_wf(f"p{i}")) for i in (1, 2)]
    s.wait_status(running, ("running",))
    wait_until(lambda: "start long" in s.sleep_log(), message="the long prompt to be inside its node")
    s.kill()  # SIGKILL: no shutdown code runs
    assert stored_statuses(s) == {
        finished: "success",
        running: "running",
        pending[0]: "pending",
        pending[1]: "pending",
    }

    s.start()
    gate.touch()
    # the finished prompt is still in the history, unchanged
    assert s.entry(finished) == first
    # the prompt that was running goes back to the front of the queue; the pending ones follow
    for pid in (running, *pending):
        assert s.wait_status(pid)["status"] == "success"
    assert s.sleep_log() == [
        "start finished",
        "done finished",
        "start long",  # before the kill
        "start long",
        "done long",
        "start p1",
        "done p1",
        "start p2",
        "done p2",
    ]
    history = s.get_json("/api/history")["items"]
    assert [e["prompt_id"] for e in history] == [pending[1], pending[0], running, finished]
    assert all(e["status"] == "success" for e in history)
    assert s.entry(running)["outputs"] == {"1": {"slept": ["long"]}}

    # a graceful stop (Ctrl-C) while a prompt runs leaves it in the state the kill left `running` in,
    # which the restart above showed is run again; its gate file never appears, so it cannot
    # finish before the stop arrives, however slow the machine
    again = s.submit(sleep_wf("again", gate=str(s.root / "never")))
    after = s.submit(sleep_wf("after"))
    s.wait_status(again, ("running",))
    wait_until(lambda: "start again" in s.sleep_log(), message="the prompt to be inside its node")
    s.stop()
    assert s.proc.returncode == 0, s.log_text()[-3000:]
    statuses = stored_statuses(s)
    assert statuses[again] == "running" and statuses[after] == "pending"
    assert statuses[finished] == statuses[running] == "success"
    log = s.sleep_log()[9:]
    assert log[0] == "start again" and log[1].startswith("interrupted again at ")  # stopped at its next step
    assert len(log) == 2
