"""Real servers on loopback for the tests: S3 (moto), a recording platform backend, MLflow.

Each one is reached over real HTTP by the code under test, the same way it reaches the platform's
services in production. Every address is 127.0.0.1; every server is stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_UTILS = REPO / "template" / "utils.py"
CALLBACK_API = REPO / "schemas" / "callback-api.openapi.json"

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def closed_port_url(scheme: str = "http") -> str:
    """A loopback URL on which every connection is refused at once."""
    return f"{scheme}://{LOOPBACK}:{free_port()}"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll `condition` until it holds or `timeout` passes; the last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


# ---------------------------------------------------------------------------------------------
# S3: moto's server mode
# ---------------------------------------------------------------------------------------------

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"


class _RecordingMotoServer:
    """moto's ThreadedMotoServer, plus a log of the requests it served and a socket that is
    really closed on stop (moto leaves it listening, so clients would hang, not be refused)."""

    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.copies: list[str] = []  # paths written by a server-side copy (x-amz-copy-source)
        requests_log, copies_log = self.requests, self.copies

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.moto_server.werkzeug_app import MotoRequestHandler
                from moto.server import DomainDispatcherApplication, create_backend_app
                from werkzeug.serving import make_server

                moto_app = DomainDispatcherApplication(create_backend_app)

                def app(environ, start_response):
                    requests_log.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
                    if "HTTP_X_AMZ_COPY_SOURCE" in environ:
                        copies_log.append(environ["PATH_INFO"])
                    return moto_app(environ, start_response)

                self._server = make_server(self._ip_address, self._port, app, True,
                                           request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = Server(ip_address=LOOPBACK, port=port, verbose=False)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        inner = self._server._server
        self._server.stop()
        if inner is not None:
            inner.server_close()


class S3Server:
    """An S3 endpoint on loopback (moto server mode), reached by boto3 over HTTP.

    The server lives for the session; the `s3` fixture gives each test a fresh `bucket`.
    `stop()`/`start()` take it down and bring it back on the same port with its data (moto keeps
    the data in this process), for outage tests.
    """

    def __init__(self) -> None:
        import boto3
        from botocore.config import Config

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.bucket = ""
        self._moto = _RecordingMotoServer(self.port)
        self.running = False
        self.start()
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=10))

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the server answered, since the test began."""
        return self._moto.requests

    @property
    def copies(self) -> list[str]:
        """Paths written by server-side copies (no body sent), since the test began."""
        return self._moto.copies

    def new_bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        self.bucket = name
        self._moto.requests.clear()
        self._moto.copies.clear()
        return name

    def env(self) -> dict[str, str]:
        return {"STORAGE_TYPE": "minio", "MINIO_ENDPOINT": self.endpoint,
                "MINIO_ACCESS_KEY": ACCESS_KEY, "MINIO_SECRET_KEY": SECRET_KEY,
                "STORAGE_BUCKET": self.bucket}

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    def enforce_auth(self, enforced: bool) -> None:
        """Make moto check credentials (ours are unknown to it: every request gets a 403)."""
        import requests

        count = "0" if enforced else "inf"
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=count, timeout=5
                      ).raise_for_status()

    @contextlib.contextmanager
    def auth_enforced(self) -> Iterator[None]:
        self.enforce_auth(True)
        try:
            yield
        finally:
            self.enforce_auth(False)

    def stop(self) -> None:
        if self.running:
            self._moto.stop()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self._moto.start()
            self.running = True


class SlowLink:
    """A TCP proxy on loopback in front of a server: a slow, unreliable network path to it.

    Small test checkpoints cross a direct loopback link in a millisecond, so code that reports
    `completed` before its uploads finished, or forgets to wait for `last.pt` on cancel, looks
    right. Through this link every byte the client sends is held to `rate` bytes/s, so an
    upload of N bytes takes N / rate seconds, and `fail_next` answers the next requests itself
    with an S3 error the SDK does not retry (409 OperationAborted: "try again"), so only the
    trainer's own retries can get the object through.
    """

    CHUNK = 8192

    def __init__(self, upstream_port: int, rate: float = 256 * 1024) -> None:
        self.upstream_port, self.rate = upstream_port, rate
        self.failed: list[str] = []  # request lines answered with an injected error
        self._fail_left = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, name="slow-link", daemon=True).start()

    def fail_next(self, count: int) -> None:
        """Answer the next `count` requests with 409 OperationAborted, each on its own
        connection (closed after the answer)."""
        with self._lock:
            self._fail_left = count

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            failing = self._fail_left > 0
            self._fail_left -= failing
        if failing:
            self._answer_error(client)
            return
        try:
            upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=10)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()
        self._pump(client, upstream, self.rate)

    def _pump(self, source: socket.socket, dest: socket.socket, rate: float | None) -> None:
        try:
            while data := source.recv(self.CHUNK):
                dest.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, dest):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _answer_error(self, client: socket.socket) -> None:
        """Read the request head (and its body, unless the client waits for 100-continue),
        then answer the error and close, as an overloaded S3 front end would."""
        with client:
            client.settimeout(10)
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head and (data := client.recv(self.CHUNK)):
                    head += data
            head, _, body = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.failed.append(lines[0])
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in lines[1:])}
            if fields.get("expect", "").lower() != "100-continue":
                left = int(fields.get("content-length", "0") or 0) - len(body)
                with contextlib.suppress(OSError):
                    while left > 0 and (data := client.recv(min(left, self.CHUNK))):
                        left -= len(data)
            xml = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>OperationAborted"
                   b"</Code><Message>A conflicting conditional operation is currently in "
                   b"progress against this resource. Please try again.</Message></Error>")
            with contextlib.suppress(OSError):
                client.sendall(b"HTTP/1.1 409 Conflict\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: " + str(len(xml)).encode() +
                               b"\r\nConnection: close\r\n\r\n" + xml)


# ---------------------------------------------------------------------------------------------
# The platform backend: records every callback, with fault controls
# ---------------------------------------------------------------------------------------------

CALLBACK_BASE_PATH = "/api/v1/internal/training/"


@dataclasses.dataclass
class Call:
    method: str
    route: str  # relative to the job's base path: "status", "training-metrics", ...
    headers: Mapping[str, str]  # case-insensitive
    body: dict[str, Any]
    time: float  # time.monotonic() on arrival
    path: str = ""  # the full request path, to check the base path was joined, not replaced
    answered: int = 200

    @property
    def envelope(self) -> dict[str, Any]:
        """The event's own fields (`job_id`, `seq`): the body, or the first record of a list
        body (per-image results: every record carries the event's `job_id` and `seq`)."""
        if isinstance(self.body, list):
            return self.body[0] if self.body and isinstance(self.body[0], dict) else {}
        return self.body


# Every body a job wired by `RecordingBackend.env` sent that the published callback API rejects,
# as "<test backend url> <METHOD> /<route>: <problem>", across the whole test session (conftest
# fails the session if any).
BODY_VIOLATIONS: list[str] = []


@functools.cache
def _callback_api() -> dict[str, Any]:
    return json.loads(CALLBACK_API.read_text(encoding="utf-8"))


def callback_body_problems(method: str, route: str, body: Any) -> list[str]:
    """Why `body` is not a valid request of `method /route` in schemas/callback-api.openapi.json."""
    import jsonschema

    api = _callback_api()
    operation = api["paths"].get(f"/{route}", {}).get(method.lower())
    if operation is None:
        return [f"{method} /{route} is not in the callback API"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; refs resolve against the whole document.
    validator = jsonschema.Draft202012Validator({**schema, "components": api["components"]})
    return [f"{'/'.join(map(str, error.absolute_path)) or '(body)'}: {error.message}"
            for error in validator.iter_errors(body)]


class RecordingBackend:
    """The platform's callback endpoints on 127.0.0.1, recording each call.

    `calls` holds the events the backend stored (answered 2xx, first time their Idempotency-Key
    was seen); `duplicates` the repeats (answered 200, not stored again); `rejected` the calls
    answered with an error status by a fault control. `POST /logs` lines are kept apart in
    `logs` (they obey set_status / set_hang / set_down, not fail_every), so counting events is
    not disturbed by a job's log lines. Like the real backend, a stored validation result is
    answered with its `validation_result_id` (1, 2, ...; `result_ids=False`: none).
    """

    def __init__(self, job_id: str = "job-1") -> None:
        self.calls: list[Call] = []
        self.duplicates: list[Call] = []
        self.rejected: list[Call] = []
        # Checked against the published callback API once a job is wired to this backend
        # (`env`); unit tests of the client send bodies of their own.
        self.validate_bodies = False
        self.violations: list[str] = []
        self.logs: list[Call] = []
        self.result_ids = True
        self._lock = threading.Lock()
        self._seen_keys: set[str] = set()
        self._received = 0  # every request that reached a handler, for fail_every
        self._fail_every: tuple[int, int, float | None] | None = None
        self._forced: tuple[int, float | None] | None = None
        self._cancel_at: dict[str, int] = {}
        self._hang_released = threading.Event()
        self._hang_released.set()
        self._trickle_s: float | None = None  # seconds between the bytes of every answer
        self._closing = False
        self.port = free_port()
        self.job_id = job_id
        self.url = f"http://{LOOPBACK}:{self.port}{CALLBACK_BASE_PATH}{job_id}"
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._serve()

    # -- what the tests read -------------------------------------------------------------------

    def env(self, job_id: str = "job-1", token: str = "test-token") -> dict[str, str]:
        self.validate_bodies = True
        url = f"http://{LOOPBACK}:{self.port}{CALLBACK_BASE_PATH}{job_id}"
        return {"CALLBACK_URL": url, "INTERNAL_AUTH_TOKEN": token, "JOB_ID": job_id}

    def bodies(self, route: str) -> list[dict[str, Any]]:
        with self._lock:
            return [call.body for call in self.calls if call.route == route]

    def statuses(self) -> list[str]:
        with self._lock:
            return [call.body.get("status") for call in self.calls
                    if call.method == "PATCH" and call.route == "status"]

    def wait_for_calls(self, count: int, timeout: float = 10.0) -> bool:
        return wait_until(lambda: len(self.calls) >= count, timeout)

    # -- fault controls, settable while a job runs -----------------------------------------------

    def fail_every(self, n: int, status: int = 503, retry_after: float | None = None) -> None:
        """Answer `status` to every n-th request (n=0: stop)."""
        with self._lock:
            self._fail_every = (n, status, retry_after) if n > 0 else None

    def set_status(self, status: int | None, retry_after: float | None = None) -> None:
        """Answer every request with `status` (None: back to normal 200)."""
        with self._lock:
            self._forced = (status, retry_after) if status is not None else None

    def set_hang(self, hang: bool) -> None:
        """Accept requests but never answer them; on release the hung ones are dropped."""
        if hang:
            self._hang_released.clear()
        else:
            self._hang_released.set()

    def set_trickle(self, seconds_per_byte: float | None, padding: int = 64) -> None:
        """Answer at once with the status line and headers, then send the body one byte every
        `seconds_per_byte` (None: normally). `padding` spaces after the JSON make the trickle
        last about that many steps. Calls are recorded (and stored) when they arrive."""
        with self._lock:
            self._trickle_s = seconds_per_byte
            self._trickle_padding = padding

    def set_down(self, down: bool) -> None:
        """Close the listening socket (connections refused), or listen again on the same port."""
        if down:
            self._shutdown()
        elif self._httpd is None:
            self._serve()

    def cancel_after(self, route: str, n: int) -> None:
        """Answer {"cancel": true} to the n-th stored call on `route`."""
        with self._lock:
            self._cancel_at[route] = n

    def close(self) -> None:
        self._closing = True
        self._hang_released.set()
        self._shutdown()

    # -- the server ----------------------------------------------------------------------------

    def _serve(self) -> None:
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 5  # a client that never sends its request cannot pin a thread forever

            def do_PATCH(self) -> None:
                backend._handle(self)

            do_POST = do_PUT = do_GET = do_DELETE = do_PATCH

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the recorded calls are the log

        # Rebinding the same port right after a close needs SO_REUSEADDR (HTTPServer sets it).
        for attempt in range(50):
            try:
                self._httpd = http.server.ThreadingHTTPServer((LOOPBACK, self.port), Handler)
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="backend",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _shutdown(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        released = self._hang_released.is_set()
        self._hang_released.set()  # let hung handlers finish so server_close can join them
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        if not released and not self._closing:
            self._hang_released.clear()

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        from requests.structures import CaseInsensitiveDict

        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        if not self._hang_released.is_set():
            self._hang_released.wait()
            request.close_connection = True
            return  # never answered
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        path = request.path
        route = path
        if path.startswith(CALLBACK_BASE_PATH):
            route = path[len(CALLBACK_BASE_PATH):].partition("/")[2]
        call = Call(request.command, route, CaseInsensitiveDict(request.headers.items()),
                    body, time.monotonic(), path)
        if self.validate_bodies:
            problems = [f"{self.url} {call.method} /{route}: {problem}"
                        for problem in callback_body_problems(call.method, route, body)]
            self.violations.extend(problems)
            BODY_VIOLATIONS.extend(problems)

        if route == "logs":
            with self._lock:
                status, retry_after = self._record_log(call)
            self._answer(request, status, {"status": "ok"}, retry_after)
            return
        with self._lock:
            self._received += 1
            status, retry_after = 200, None
            if self._forced is not None:
                status, retry_after = self._forced
            elif self._fail_every and self._received % self._fail_every[0] == 0:
                _, status, retry_after = self._fail_every
            answer: dict[str, Any] = {"ok": True}
            if status >= 300:
                call.answered = status
                self.rejected.append(call)
                answer = {"detail": f"HTTP {status} from the test backend"}
            else:
                key = call.headers.get("Idempotency-Key")
                if key and key in self._seen_keys:
                    self.duplicates.append(call)
                else:
                    if key:
                        self._seen_keys.add(key)
                    self.calls.append(call)
                    stored_on_route = sum(1 for c in self.calls if c.route == route)
                    if self._cancel_at.get(route) == stored_on_route:
                        answer = {"ok": True, "cancel": True}
                    if route == "validation-results" and self.result_ids:
                        answer = {**answer, "status": "ok",
                                  "validation_result_id": stored_on_route}

        self._answer(request, status, answer, retry_after)

    def _record_log(self, call: Call) -> tuple[int, float | None]:
        status, retry_after = self._forced if self._forced is not None else (200, None)
        if status < 300:
            key = call.headers.get("Idempotency-Key")
            if not (key and key in self._seen_keys):
                self._seen_keys.add(key)
                self.logs.append(call)
        return status, retry_after

    def _answer(self, request: http.server.BaseHTTPRequestHandler, status: int,
                answer: dict[str, Any], retry_after: float | None) -> None:
        payload = json.dumps(answer).encode()
        trickle = self._trickle_s
        if trickle is not None:
            payload += b" " * self._trickle_padding
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        if retry_after is not None:
            request.send_header("Retry-After", f"{retry_after:g}")
        request.end_headers()
        if trickle is None:
            request.wfile.write(payload)
            return
        request.wfile.flush()
        for index in range(len(payload)):
            if self._closing:
                return
            try:
                request.wfile.write(payload[index:index + 1])
                request.wfile.flush()
            except OSError:  # the client gave up on the answer
                return
            time.sleep(trickle)


# ---------------------------------------------------------------------------------------------
# MLflow tracking server
# ---------------------------------------------------------------------------------------------

class MlflowServer:
    """`mlflow server` on loopback with a SQLite store, in its own process group."""

    def __init__(self, root: Path, *, wait: bool = True) -> None:
        """Launch the server; with wait=False, call `wait_ready()` before using it."""
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        port = free_port()
        self.uri = f"http://{LOOPBACK}:{port}"
        self._log_path = root / "server.log"
        self._ready = False
        # The job runner (GenAI jobs, eight huey worker processes) is of no use here and costs
        # seconds of a 2-core machine's startup.
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self._log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", str(root / "artifacts"),
                 "--host", LOOPBACK, "--port", str(port), "--workers", "1"],
                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root,
                start_new_session=True)  # its workers share the group: stop() ends them all
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until /health answers; raise with the server's log if it died or never did."""
        import requests

        if self._ready:
            return

        def healthy() -> bool:
            if self._process.poll() is not None:
                return True  # died: stop waiting, reported below
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{self.uri}/health", timeout=1).status_code == 200
            return False

        if not wait_until(healthy, timeout, every=0.25) or self._process.poll() is not None:
            log_tail = self._log_path.read_text(errors="replace")[-3000:]
            self.stop()
            raise RuntimeError(f"mlflow server did not become healthy:\n{log_tail}")
        self._ready = True

    def runs(self, experiment_name: str = "vision-platform") -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id])

    def stop(self) -> None:
        if self._process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            # uvicorn waits for idle keep-alive clients (this test process) on SIGTERM: cap it.
            self._process.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(5)
