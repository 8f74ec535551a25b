"""CallbackClient of template/utils.py against a recording backend on loopback."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest

from tests.support.servers import CALLBACK_BASE_PATH, wait_until

TOKEN = "test-token-3f9a1c"


def make_client(utils, backend, tmp_path, **kwargs):
    kwargs.setdefault("max_backoff", 0.5)  # keep retries quick; the schedule is not under test
    return utils.CallbackClient(backend.url, TOKEN, "job-1", tmp_path / "callbacks.jsonl",
                                **kwargs)


def send_metrics(client, epochs: range) -> None:
    for epoch in epochs:
        client.send("POST", "training-metrics", {"epoch": epoch, "step": epoch, "loss": 1 / epoch})


def journal(tmp_path) -> list[dict]:
    lines = (tmp_path / "callbacks.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def callback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "callbacks"]


def test_events_arrive_in_order_with_headers_and_ids(utils_module, backend, tmp_path):
    client = make_client(utils_module, backend, tmp_path)
    client.send("PATCH", "status", {"status": "running"})
    send_metrics(client, range(1, 11))
    client.send("PATCH", "status", {"status": "completed"})
    assert client.close(timeout=10)

    assert [c.body["seq"] for c in backend.calls] == list(range(1, 13))
    assert backend.statuses() == ["running", "completed"]
    assert [b["epoch"] for b in backend.bodies("training-metrics")] == list(range(1, 11))
    for call in backend.calls:
        seq = call.body["seq"]
        assert call.body["job_id"] == "job-1"
        assert call.headers["X-Internal-Auth"] == TOKEN
        assert call.headers["Content-Type"] == "application/json"
        assert re.fullmatch(rf"job-1:train:[0-9a-f]{{12}}:{seq}", call.headers["Idempotency-Key"])
    assert backend.calls[0].method == "PATCH" and backend.calls[1].method == "POST"
    assert backend.duplicates == [] and backend.rejected == []


def test_url_path_is_joined_not_replaced(utils_module, backend, tmp_path):
    client = utils_module.CallbackClient(backend.url + "/", TOKEN, "job-1",
                                         tmp_path / "callbacks.jsonl")
    client.send("POST", "validation-results", {"epoch": 1})
    assert client.close(timeout=10)
    assert [c.path for c in backend.calls] == [f"{CALLBACK_BASE_PATH}job-1/validation-results"]


def test_every_event_is_journaled_before_delivery(utils_module, backend, tmp_path):
    backend.set_down(True)
    client = make_client(utils_module, backend, tmp_path)
    send_metrics(client, range(1, 4))
    entries = journal(tmp_path)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["route"] == "training-metrics" and entries[0]["body"]["epoch"] == 1
    assert TOKEN not in (tmp_path / "callbacks.jsonl").read_text()
    assert not client.close(timeout=0.3)


def test_seq_continues_after_a_restart_on_the_same_work_dir(utils_module, backend, tmp_path):
    first = make_client(utils_module, backend, tmp_path)
    send_metrics(first, range(1, 4))
    assert first.close(timeout=10)
    second = make_client(utils_module, backend, tmp_path)
    second.send("PATCH", "status", {"status": "running"})
    assert second.close(timeout=10)
    keys = [c.headers["Idempotency-Key"] for c in backend.calls]
    assert keys[-1].startswith("job-1:train:") and keys[-1].endswith(":4")
    assert keys[-1].rsplit(":", 1)[0] != keys[0].rsplit(":", 1)[0]  # a new attempt's own keys
    assert backend.duplicates == []


def test_server_errors_are_retried_and_each_event_delivered_once(utils_module, backend,
                                                                 tmp_path):
    backend.fail_every(3, status=503)
    client = make_client(utils_module, backend, tmp_path)
    send_metrics(client, range(1, 13))
    assert client.close(timeout=30)
    assert [b["epoch"] for b in backend.bodies("training-metrics")] == list(range(1, 13))
    assert len(backend.rejected) >= 4  # the faults really happened
    assert backend.duplicates == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_refusal_stops_delivery_with_one_warning(utils_module, backend, tmp_path, caplog,
                                                      status):
    backend.set_status(status)
    client = make_client(utils_module, backend, tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        send_metrics(client, range(1, 11))
        assert wait_until(lambda: client.disabled_reason is not None, timeout=5)
        client.send("PATCH", "status", {"status": "completed"})  # after the refusal, too
        # Every queued event handled: a (wrong) retry would have happened before close returns.
        assert client.close(timeout=2)
    assert len(backend.rejected) == 1  # no retry storm
    assert backend.calls == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"HTTP {status}" in warnings[0].getMessage()
    assert [e["seq"] for e in journal(tmp_path)] == list(range(1, 12))  # nothing lost


def test_unreadable_body_is_logged_loudly_and_not_retried(utils_module, backend, tmp_path,
                                                          caplog):
    backend.set_status(422)
    client = make_client(utils_module, backend, tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        send_metrics(client, range(1, 3))
        assert client.close(timeout=5)
    assert len(backend.rejected) == 2  # each tried once, and the second was still sent
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]


def test_hung_backend_never_blocks_the_caller(utils_module, backend, tmp_path):
    backend.set_hang(True)
    client = make_client(utils_module, backend, tmp_path, timeout=(1.0, 30.0))
    started = time.monotonic()
    send_metrics(client, range(1, 21))
    assert time.monotonic() - started < 0.2
    started = time.monotonic()
    assert client.close(timeout=1.0) is False
    assert time.monotonic() - started < 1.5
    assert client.pending() > 0


def test_down_backend_gets_everything_in_order_once_it_is_back(utils_module, backend, tmp_path):
    backend.set_down(True)
    client = make_client(utils_module, backend, tmp_path)
    send_metrics(client, range(1, 11))
    for _ in range(2):  # two failed attempts while it is down
        assert client.retry_waiting.wait(timeout=10)
        client.retry_waiting.clear()
    assert backend.calls == []
    backend.set_down(False)
    assert client.close(timeout=15)
    assert [c.body["seq"] for c in backend.calls] == list(range(1, 11))


def test_exit_drain_is_not_spent_in_a_backoff_grown_during_an_outage(utils_module, backend,
                                                                      tmp_path, monkeypatch):
    # The backoff after a long outage: every wait 20 s, longer than the exit's flush budget.
    monkeypatch.setattr(utils_module, "backoff_delays", lambda base, cap: iter(lambda: 20.0, None))
    backend.set_down(True)
    client = make_client(utils_module, backend, tmp_path, max_backoff=30.0)
    send_metrics(client, range(1, 4))
    assert client.retry_waiting.wait(timeout=5)  # the first attempt failed: its 20 s wait
    backend.set_down(False)
    backend.fail_every(3, 503)  # back, but shedding load: a retry is needed while draining
    started = time.monotonic()
    assert client.close(timeout=5)
    assert time.monotonic() - started < 4
    assert [c.body["seq"] for c in backend.calls] == [1, 2, 3]
    assert backend.rejected


def test_retry_after_is_honoured(utils_module, backend, tmp_path):
    backend.set_status(429, retry_after=1.5)
    client = make_client(utils_module, backend, tmp_path, max_backoff=5.0)
    client.send("PATCH", "status", {"status": "running"})
    assert wait_until(lambda: len(backend.rejected) == 1, timeout=5)
    backend.set_status(None)
    assert client.close(timeout=10)
    waited = backend.calls[0].time - backend.rejected[0].time
    assert waited >= 1.4  # our own backoff would have retried after 0.5 s
    assert len(backend.rejected) == 1


def test_cancel_answer_triggers_on_cancel(utils_module, backend, tmp_path):
    cancelled = threading.Event()
    backend.cancel_after("training-metrics", 2)
    client = make_client(utils_module, backend, tmp_path, on_cancel=cancelled.set)
    send_metrics(client, range(1, 2))
    assert client.close(timeout=5)
    assert not cancelled.is_set()
    send_metrics(client, range(2, 3))
    assert wait_until(cancelled.is_set, timeout=5)


def test_without_callback_url_nothing_is_sent(utils_module, backend, tmp_path):
    client = utils_module.CallbackClient(None, TOKEN, "job-1", tmp_path / "callbacks.jsonl")
    threads_before = callback_threads()
    send_metrics(client, range(1, 4))
    assert client.close(timeout=1)
    assert callback_threads() == threads_before
    assert [e["seq"] for e in journal(tmp_path)] == [1, 2, 3]
    assert backend.calls == [] and backend.rejected == []


def test_token_never_appears_in_logs(utils_module, backend, tmp_path, caplog):
    client = make_client(utils_module, backend, tmp_path)
    with caplog.at_level(logging.DEBUG):
        backend.fail_every(2, status=500)
        send_metrics(client, range(1, 5))
        assert client.close(timeout=10)
        backend.set_status(422)
        send_metrics(client, range(5, 6))
        backend.set_status(401)
        send_metrics(client, range(6, 7))
        client.close(timeout=5)
    assert caplog.records  # the faults were logged ...
    assert TOKEN not in caplog.text  # ... without the token
