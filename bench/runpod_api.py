"""RunPod's job API, the side a worker talks to, on 127.0.0.1: for tests and benchmarks of the real job loop.

A worker started with ``worker_env()`` runs ``runpod.serverless.start`` exactly as on RunPod: runpod takes jobs
from this server, posts their progress and results to it and pings it. Each endpoint mirrors what the pinned
runpod (1.12.0) sends, module by module of ``runpod/serverless/modules/``:

- ``GET /v2/test/job-take/{worker}?gpu=test&job_in_progress=0|1``: ``rp_job.get_job`` with one job wanted;
  answered with one job, ``{"id", "input"}``, or 204 when none came within ``take_hold_s`` (a long poll).
- ``GET /v2/test/job-take-batch/{worker}?gpu=test&batch_size=N&job_in_progress=0|1``: ``rp_job.get_job`` with
  N > 1 wanted (``rp_scale.JobScaler.get_jobs`` asks for concurrency minus occupancy): a JSON list of up to N.
- ``GET /v2/test/job-stop/{worker}?gpu=test``: ``rp_job.get_stop_signals``, the stop channel runpod derives
  from the job-take URL (``JobScaler.monitor_stop_signals``): ``{"jobsToStop": [ids]}``, or 204 after
  ``take_hold_s``.
- ``POST /v2/test/job-done/{worker}/{job}?gpu=test&isStream=false``: ``rp_http.send_result``, JSON text sent as
  x-www-form-urlencoded; a final result (``output``, ``error``, ``stopPod``), or from ``rp_progress.progress_update``
  ``{"status": "IN_PROGRESS", "output": progress}`` on the same URL, from a thread of its own.
- ``GET /v2/test/ping/{worker}?gpu=test&job_id=a,b&runpod_version=V``: ``rp_ping.Heartbeat``, a separate process
  that pings every ``RUNPOD_PING_INTERVAL`` ms with the ids of the jobs in progress (``worker_state.PingJobMirror``);
  without jobs ``job_id`` is absent.

Every request must carry ``RUNPOD_AI_API_KEY`` as its ``Authorization`` header, as runpod sends it; others are
answered 401 and listed in ``unauthorized``.

Faults apply to the next ``count`` requests of their kind that arrive after the call; result faults apply to
final results only, never to progress posts.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "test-runpod-api-key"
ENDPOINT = "/v2/test"


@dataclass
class _Fault:
    """A fault for the next ``count`` requests of one kind."""

    count: int = 0
    status: int = 500
    seconds: float = 0.0

    def use(self) -> bool:
        """Whether this request gets the fault; uses one up."""
        if self.count <= 0:
            return False
        self.count -= 1
        return True


class RunPodAPI:
    """RunPod's job API, the side a worker talks to, on 127.0.0.1 (http.server.ThreadingHTTPServer in a daemon thread).

    Args:
        take_hold_s: an empty job-take or job-stop long poll is held this long, then answered 204; a job
            submitted (or a job cancelled) meanwhile answers it at once.
    """

    def __init__(self, *, take_hold_s: float = 0.5) -> None:
        self.take_hold_s = take_hold_s
        # What it saw, written under _changed; safe to read without it, as entries are only ever added.
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.progress: dict[str, list[Any]] = {}
        self.pings: list[dict[str, str]] = []
        self.taken: dict[str, int] = {}
        # Query parameters of every job-take, batch or not, with "path": "job-take" or "job-take-batch".
        self.takes: list[dict[str, str]] = []
        self.unauthorized: list[str] = []

        self._changed = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._to_stop: list[str] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._take_faults: deque[tuple[str, _Fault]] = deque()
        self._result_faults: deque[tuple[str, _Fault]] = deque()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- the server ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT/v2/test, once started."""
        if self._server is None:
            raise RuntimeError("RunPodAPI is not started: use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}{ENDPOINT}"

    def __enter__(self) -> RunPodAPI:
        api = self

        class Handler(_Handler):
            pass

        Handler.api = api
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="runpod-api", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _traceback: TracebackType | None
    ) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def worker_env(self, pod_id: str = "test-worker") -> dict[str, str]:
        """The variables RunPod gives a worker, pointing at this server; ``pod_id`` is the worker's id."""
        return {
            # runpod replaces $ID with the worker id, and derives /job-stop/ from /job-take/.
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/job-take/$ID?gpu=test",
            # runpod replaces $RUNPOD_POD_ID at import, and $ID with each job's id.
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{self.url}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_AI_API_KEY": API_KEY,
            "RUNPOD_POD_ID": pod_id,
            # Milliseconds, divided by 1000 in whole seconds: below 1000 runpod pings without pause.
            "RUNPOD_PING_INTERVAL": "1000",
            # Not from RunPod: runpod's own startup checks (rp_system_fitness) connect to 8.8.8.8:53 and
            # want 4 GB of free memory; a worker that fails one exits. Off, so that nothing leaves 127.0.0.1.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        }

    # --- jobs ----------------------------------------------------------------------------------

    def submit(self, job_input: dict[str, Any], job_id: str | None = None) -> str:
        """Queue a job; returns its id. A job-take waiting meanwhile gets it at once."""
        job_id = job_id or f"job-{next(self._ids)}"
        with self._changed:
            self._queue.append({"id": job_id, "input": job_input})
            self._changed.notify_all()
        return job_id

    def cancel(self, job_id: str) -> None:
        """Stop a job: removed if it was not taken yet, else handed to the worker on its next stop poll."""
        with self._changed:
            queued = [job for job in self._queue if job["id"] == job_id]
            if queued:
                self._queue.remove(queued[0])
            else:
                self._to_stop.append(job_id)
            self._changed.notify_all()

    def wait_for(self, job_ids: Iterable[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Each job's final result (its first final post), once all have one.

        Raises:
            TimeoutError: some have none after ``timeout_s``; it names them.
        """
        wanted = list(job_ids)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while missing := [job_id for job_id in wanted if not self.results.get(job_id)]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result within {timeout_s:g} s for {', '.join(missing)}")
                self._changed.wait(left)
            return {job_id: self.results[job_id][0] for job_id in wanted}

    def wait_until(self, what: str, check: Callable[[], object], timeout_s: float) -> None:
        """Wait until ``check()`` is true: called under the lock when the server records something, and at
        least every 0.1 s (so that it may look at things the server does not see, such as a worker's log).

        Raises:
            TimeoutError: not within ``timeout_s``; the message says ``what`` was awaited.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"not within {timeout_s:g} s: {what}")
                self._changed.wait(min(left, 0.1))

    # --- faults --------------------------------------------------------------------------------

    def fail_takes(self, count: int = 1, status: int = 500) -> None:
        """Answer the next ``count`` job-takes with ``status`` and no job."""
        with self._changed:
            self._take_faults.append(("fail", _Fault(count, status=status)))

    def drop_takes(self, count: int = 1) -> None:
        """Close the connection on the next ``count`` job-takes without answering; no job is handed out."""
        with self._changed:
            self._take_faults.append(("drop", _Fault(count)))

    def slow_results(self, count: int = 1, seconds: float = 3.0) -> None:
        """Record the next ``count`` results when they arrive, but answer 200 only ``seconds`` later
        (or at ``release_results``)."""
        with self._changed:
            self._release.clear()
            self._result_faults.append(("slow", _Fault(count, seconds=seconds)))

    def release_results(self) -> None:
        """Answer the result posts that ``slow_results`` holds now."""
        self._release.set()

    def drop_results(self, count: int = 1) -> None:
        """Close the connection on the next ``count`` results without answering or recording them.

        runpod 1.12.0 does not send such a result again: aiohttp_retry retries only the exceptions it is
        given, and runpod gives none; it logs "Failed to return job results" and the result is lost.
        """
        with self._changed:
            self._result_faults.append(("drop", _Fault(count)))

    @staticmethod
    def _next_fault(faults: deque[tuple[str, _Fault]]) -> tuple[str, _Fault] | None:
        while faults:
            kind, fault = faults[0]
            if fault.use():
                return kind, fault
            faults.popleft()
        return None

    # --- what the handler calls, under no lock ------------------------------------------------

    def _take(self, query: dict[str, str], batch: bool) -> tuple[str, Any]:
        """("drop", None), ("status", code) or ("jobs", jobs): the answer to a job-take."""
        wanted = int(query.get("batch_size", "1")) if batch else 1
        deadline = time.monotonic() + self.take_hold_s
        with self._changed:
            self.takes.append({"path": "job-take-batch" if batch else "job-take", **query})
            self._changed.notify_all()
            fault = self._next_fault(self._take_faults)
            if fault is not None:
                kind, details = fault
                return ("drop", None) if kind == "drop" else ("status", details.status)
            while not self._queue and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            jobs = [self._queue.popleft() for _ in range(min(wanted, len(self._queue)))]
            for job in jobs:
                self.taken[job["id"]] = self.taken.get(job["id"], 0) + 1
            self._changed.notify_all()
        return "jobs", jobs

    def _stop_poll(self) -> list[str]:
        deadline = time.monotonic() + self.take_hold_s
        with self._changed:
            while not self._to_stop and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            job_ids, self._to_stop = self._to_stop, []
        return job_ids

    def _result(self, job_id: str, body: dict[str, Any]) -> bool:
        """Record a post; False when its connection is to be dropped unrecorded."""
        final = body.get("status") != "IN_PROGRESS"
        hold = 0.0
        with self._changed:
            fault = self._next_fault(self._result_faults) if final else None
            if fault is not None and fault[0] == "drop":
                return False
            if fault is not None:
                hold = fault[1].seconds
            if final:
                self.results.setdefault(job_id, []).append(body)
            else:
                self.progress.setdefault(job_id, []).append(body.get("output"))
            self._changed.notify_all()
        if hold:
            self._release.wait(hold)
        return True

    def _ping(self, query: dict[str, str]) -> None:
        with self._changed:
            self.pings.append(query)
            self._changed.notify_all()

    def _refuse(self, path: str) -> None:
        with self._changed:
            self.unauthorized.append(path)
            self._changed.notify_all()


class _Handler(BaseHTTPRequestHandler):
    """One request: routes it to the RunPodAPI it belongs to."""

    api: RunPodAPI
    # HTTP/1.0: one request per connection, as a long poll wants; runpod's aiohttp opens a new one each time.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test reads what the server recorded, not its access log."""

    def _route(self) -> tuple[list[str], dict[str, str]] | None:
        parts = urlsplit(self.path)
        if not parts.path.startswith(ENDPOINT + "/"):
            self._send(HTTPStatus.NOT_FOUND)
            return None
        if self.headers.get("Authorization") != API_KEY:
            self.api._refuse(self.path)
            self._send(HTTPStatus.UNAUTHORIZED)
            return None
        return parts.path[len(ENDPOINT) + 1 :].split("/"), dict(parse_qsl(parts.query))

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        segments, query = route
        kind = segments[0]
        if kind in ("job-take", "job-take-batch"):
            answer, value = self.api._take(query, batch=kind == "job-take-batch")
            if answer == "drop":
                self.close_connection = True
            elif answer == "status":
                self._send(value)
            elif not value:
                self._send(HTTPStatus.NO_CONTENT)
            else:
                self._send_json(value if kind == "job-take-batch" else value[0])
        elif kind == "job-stop":
            job_ids = self.api._stop_poll()
            if job_ids:
                self._send_json({"jobsToStop": job_ids})
            else:
                self._send(HTTPStatus.NO_CONTENT)
        elif kind == "ping":
            self.api._ping(query)
            self._send(HTTPStatus.OK)
        else:
            self._send(HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        route = self._route()
        if route is None:
            return
        segments, query = route
        if segments[0] != "job-done" or len(segments) != 3 or query.get("isStream") != "false":
            self._send(HTTPStatus.NOT_FOUND)
            return
        # runpod sends JSON text under an x-www-form-urlencoded content type.
        if self.api._result(segments[2], json.loads(body)):
            self._send(HTTPStatus.OK)
        else:
            self.close_connection = True

    def _send(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_json(self, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
