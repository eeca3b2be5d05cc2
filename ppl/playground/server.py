"""The playground's HTTP server: one static page and a small JSON API.

    GET  /                       the page (static/index.html, playground.css, playground.js)
    GET  /api/info               methods, defaults and the limits (time, particles, samples)
    GET  /api/examples           the gallery: [{name, title, has_data}]
    GET  /api/examples/NAME      {name, source, data, method, particles, samples, burn_in, options}
    POST /api/highlight          {source} -> {tokens: [[kind, text], ...]} (compiler.highlight)
    POST /api/run                {source, data, method, particles, samples, burn_in, seed, entry, options}
                                 -> 200 {ok: true, header, table, result, plot, graph, ...}
                                 or {ok: false, error: {kind, message, hint, file, line, col, caret, ...}}
                                 with 400 (the model's error), 413 (body too large), 422 (a cap),
                                 429 (busy), 504 (the time limit), 500 (internal)

Runs are bounded: each one runs in a worker process (``worker.py``) that is killed when it
passes the time limit; a model runs once at a time and at most ``workers`` runs go on at
once (a second one is answered "busy" at once, never queued); particles, samples and
burn-in have caps; request bodies have a size cap. Nothing is evaluated as Python: a
model is ppl source, run by ``Model.run``.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

STATIC = Path(__file__).with_name("static")
_STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                 "/index.html": ("index.html", "text/html; charset=utf-8"),
                 "/playground.css": ("playground.css", "text/css; charset=utf-8"),
                 "/playground.js": ("playground.js", "text/javascript; charset=utf-8")}
#: the examples folder of a source checkout (the gallery), when there is one
DEFAULT_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: the methods the picker offers first (every registered method is offered)
PREFERRED_METHODS = ("enumerate", "importance", "smc", "mh", "nuts", "hmc", "tempering", "resample_move", "prior")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Model.run's MCMC options that count draws; capped by ``max_samples``
_SAMPLE_OPTIONS = ("samples", "burn_in", "warmup")


@dataclass
class Limits:
    """The playground's bounds on one run (each named in the error that enforces it)."""

    time_limit: float = 60.0  # seconds of one run (the worker is killed after it)
    max_particles: int = 100_000  # particles, or chains for MCMC
    max_samples: int = 10_000  # MCMC draws per chain, burn-in, warm-up
    max_body: int = 1_000_000  # bytes of a request body
    workers: int = 1  # runs at the same time (one per model in any case)
    startup_limit: float = 180.0  # seconds a fresh worker may take to import ppl


class PlaygroundError(Exception):
    """An answer other than a result: HTTP status + the error's JSON."""

    def __init__(self, status: int, kind: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.hint = status, kind, message, hint

    def json(self) -> dict:
        return {"ok": False, "error": {"kind": self.kind, "message": self.message, "hint": self.hint,
                                       "text": f"{self.kind}: {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")}}


# ------------------------------------------------------------------------------ workers
class Worker:
    """One worker process, started afresh after a run it had to be stopped in."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.process = None
        self.conn = None
        self.stopped = False
        self._start_lock = threading.Lock()

    def ensure_started(self) -> None:
        """Start the process and wait until it has imported ppl (not counted in a run's time).

        The worker is ``python -m ppl.playground.worker FD``, a fresh interpreter talking
        over one end of a socket pair (``multiprocessing``'s Connection: poll with a
        timeout, send, recv): it shares nothing with the server's threads and, unlike
        multiprocessing's spawn, never re-imports the caller's main module."""
        with self._start_lock:
            if self.process is not None and self.process.poll() is None:
                return
            self._close()
            if self.stopped:
                raise PlaygroundError(503, "error", "the playground is shutting down")
            ours, theirs = socket.socketpair()
            try:
                process = subprocess.Popen([sys.executable, "-m", "ppl.playground.worker", str(theirs.fileno())],
                                           pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            finally:
                theirs.close()
            conn = Connection(ours.detach())
            self.process, self.conn = process, conn
            if self.stopped:  # stopped while starting
                process.kill()
            ready = conn.poll(self.limits.startup_limit)
            try:
                if ready and conn.recv().get("ready"):
                    return
            except (EOFError, OSError):
                pass
            self._close()
            raise PlaygroundError(500, "internal error", "the worker process failed to start (in "
                                  f"{self.limits.startup_limit:.0f} s)", "run `python -m ppl.playground.worker` "
                                  "to see why")

    def run(self, job: dict) -> dict:
        """The worker's answer to ``job``, or a time-limit error (the process is killed
        and a fresh one started in the background)."""
        self.ensure_started()
        self.conn.send(job)
        if self.conn.poll(self.limits.time_limit):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                self._close()
                raise PlaygroundError(500, "internal error", "the run's worker process ended without an answer "
                                      "(out of memory?)", "try fewer particles or a smaller model") from None
        self._close()
        threading.Thread(target=self._restart_quietly, daemon=True).start()
        raise PlaygroundError(504, "time limit",
                              f"the run took longer than the playground's time limit of {self.limits.time_limit:g} s "
                              "and was stopped",
                              "try fewer particles or samples, or a cheaper method (the limit is "
                              "`ppl playground --time-limit SECONDS`)")

    def _restart_quietly(self) -> None:
        try:
            self.ensure_started()
        except PlaygroundError:
            pass

    def _close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn = None, None

    def stop(self) -> None:
        """Kill the process (also one still starting: its start then fails quietly)."""
        self.stopped = True
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()


class Runner:
    """Runs jobs on a few workers: one run per model at a time, at most ``workers`` at once;
    anything more is answered "busy" at once."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.workers = [Worker(limits) for _ in range(max(1, limits.workers))]
        self.free = list(self.workers)
        self.running: set[str] = set()
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        """Start the workers in the background, so the first run does not wait for imports."""
        for w in list(self.free):
            threading.Thread(target=w._restart_quietly, daemon=True).start()

    def run(self, job: dict) -> dict:
        key = hashlib.sha256(json.dumps([job["source"], job.get("entry")]).encode()).hexdigest()
        with self.lock:
            if key in self.running:
                raise PlaygroundError(429, "busy", "this model is already running (one run at a time per model)",
                                      "wait for the run to finish, then try again")
            if not self.free:
                n = self.limits.workers
                raise PlaygroundError(429, "busy", f"the playground is busy with {n} other run{'s' if n > 1 else ''} "
                                      f"(at most {n} at a time)", "wait for it to finish, then try again")
            worker = self.free.pop()
            self.running.add(key)
        try:
            return worker.run(job)
        finally:
            with self.lock:
                self.running.discard(key)
                self.free.append(worker)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


# ----------------------------------------------------------------------------- requests
def check_job(body: Any, limits: Limits) -> dict:
    """A run request checked and normalised (caps, types), or a ``PlaygroundError``."""
    from ..inference import METHODS
    from ..semantics.errors import did_you_mean
    if not isinstance(body, dict):
        raise PlaygroundError(400, "error", "the request must be a JSON object")
    source = body.get("source")
    if not isinstance(source, str) or not source.strip():
        raise PlaygroundError(400, "error", "the model is empty", "write a model, e.g. `def coin():` ...")
    data = body.get("data") or "{}"
    if not isinstance(data, str):
        data = json.dumps(data)
    method = body.get("method") or "importance"
    if method not in METHODS:
        raise PlaygroundError(400, "error", f"unknown inference method '{method}'",
                              did_you_mean(str(method), METHODS) or f"available: {', '.join(METHODS)}")
    options = body.get("options") or {}
    if isinstance(options, str):
        options = _parse_options(options)
    if not isinstance(options, dict):
        raise PlaygroundError(400, "error", "options must be a JSON object", 'e.g. {"resampling": "stratified"}')
    particles = _integer(_given(body, "particles", 1000), "particles", 1)
    for name in _SAMPLE_OPTIONS:
        if body.get(name) not in (None, ""):
            options[name] = _integer(body[name], name.replace("_", "-"), 0 if name != "samples" else 1)
    if particles > limits.max_particles:
        raise PlaygroundError(422, "limit", f"particles={particles:,} is above the playground's cap of "
                              f"{limits.max_particles:,}", "use fewer particles (the cap is "
                              "`ppl playground --max-particles N`)")
    if isinstance(options.get("chains"), int) and options["chains"] > limits.max_particles:
        raise PlaygroundError(422, "limit", f"chains={options['chains']:,} is above the playground's cap of "
                              f"{limits.max_particles:,}", "use fewer chains")
    for name in _SAMPLE_OPTIONS:
        v = options.get(name)
        if isinstance(v, int) and v > limits.max_samples:
            raise PlaygroundError(422, "limit", f"{name.replace('_', '-')}={v:,} is above the playground's cap of "
                                  f"{limits.max_samples:,}", "use fewer (the cap is `ppl playground --max-samples N`)")
    seed = _integer(_given(body, "seed", 0), "seed", 0)
    entry = body.get("entry") or None
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise PlaygroundError(400, "error", f"the entry must be a function name (got {entry!r})")
    return {"source": source, "data": data, "method": method, "particles": particles, "seed": seed,
            "entry": entry, "options": options, "plot": body.get("plot", True) is not False,
            "graph": body.get("graph", True) is not False}


def _given(body: dict, name: str, default: Any) -> Any:
    """``body[name]``, or ``default`` where it is missing, null or an empty field."""
    v = body.get(name)
    return default if v is None or (isinstance(v, str) and not v.strip()) else v


def _integer(v: Any, name: str, least: int) -> int:
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v.strip())
    if not isinstance(v, int) or isinstance(v, bool):
        raise PlaygroundError(400, "error", f"{name} must be a whole number (got {v!r})")
    if v < least:
        raise PlaygroundError(400, "error", f"{name} must be at least {least} (got {v})")
    return v


def _parse_options(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        options = json.loads(text)
    except ValueError as e:
        raise PlaygroundError(400, "error", f"the options are not JSON: {e}", 'e.g. {"resampling": "stratified"}') \
            from None
    return options


# ------------------------------------------------------------------------------ examples
def examples(folder: Path | None) -> list[dict]:
    """The gallery: each ``*.ppl`` of ``folder`` with its title (the first comment line)."""
    if folder is None or not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.ppl")):
        first = next((ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("#")), "")
        title = first.lstrip("# ").split("--", 1)[-1].strip() if "--" in first else first.lstrip("# ").strip()
        out.append({"name": path.stem, "title": title, "has_data": path.with_suffix(".json").is_file()})
    return out


def example(folder: Path | None, name: str, limits: Limits) -> dict:
    """One example's source and data, with the method and sizes of its ``Run:`` line
    (capped to the playground's limits)."""
    if folder is None or not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or not (folder / f"{name}.ppl").is_file():
        raise PlaygroundError(404, "error", f"no example named '{name}'")
    source = (folder / f"{name}.ppl").read_text(errors="replace")
    data_path = folder / f"{name}.json"
    out = {"name": name, "source": source, "data": data_path.read_text(errors="replace") if data_path.is_file() else "{}"}
    out.update(_run_line(source, limits))
    return out


def _run_line(source: str, limits: Limits) -> dict:
    """The settings of the example's first ``ppl run`` line (its comment)."""
    line = next((ln for ln in source.splitlines() if ln.startswith("#") and " ppl run " in ln), None)
    settings: dict[str, Any] = {"method": "importance", "particles": 1000, "options": {}}
    if line is None:
        return settings
    try:
        words = shlex.split(line.lstrip("# "))
    except ValueError:
        return settings
    flags = {"--method": "method", "-n": "particles", "--particles": "particles", "--samples": "samples",
             "--burn-in": "burn_in", "--seed": "seed"}
    for i, w in enumerate(words[:-1]):
        value = words[i + 1]
        if w in flags:
            key = flags[w]
            settings[key] = value if key == "method" else int(value) if value.isdigit() else value
        elif w in ("-o", "--option") and "=" in value:
            k, _, raw = value.partition("=")
            try:
                settings["options"][k.replace("-", "_")] = json.loads(raw)
            except ValueError:
                settings["options"][k.replace("-", "_")] = raw
        elif w == "--kernel":
            settings["options"]["kernel"] = value
        elif w == "--scale":
            settings["options"]["scale"] = float(value)
    if isinstance(settings["particles"], int):
        settings["particles"] = min(settings["particles"], limits.max_particles)
    for k in ("samples", "burn_in"):
        if isinstance(settings.get(k), int):
            settings[k] = min(settings[k], limits.max_samples)
    return settings


def info(limits: Limits) -> dict:
    from ..inference import METHODS
    methods = [m for m in PREFERRED_METHODS if m in METHODS] + [m for m in METHODS if m not in PREFERRED_METHODS]
    # "mcmc": the methods with samples and burn-in; "chains": those whose particles are chains
    return {"methods": methods, "mcmc": [m for m in ("mh", "nuts", "hmc", "pmmh") if m in METHODS],
            "chains": [m for m in ("mh", "nuts", "hmc") if m in METHODS],
            "limits": {"time_limit": limits.time_limit, "max_particles": limits.max_particles,
                       "max_samples": limits.max_samples, "max_body": limits.max_body}}


# ------------------------------------------------------------------------------- handler
class PlaygroundServer(ThreadingHTTPServer):
    """The HTTP server with the playground's state (limits, runner, examples folder)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], limits: Limits | None = None, examples_dir: Path | None = None):
        self.limits = limits or Limits()
        self.runner = Runner(self.limits)
        self.examples_dir = examples_dir if examples_dir is not None else \
            (DEFAULT_EXAMPLES if DEFAULT_EXAMPLES.is_dir() else None)
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.runner.stop()


class Handler(BaseHTTPRequestHandler):
    server: PlaygroundServer
    server_version = "ppl-playground"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: no line per request
        pass

    # ---------------------------------------------------------------- GET
    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            if path in _STATIC_FILES:
                name, ctype = _STATIC_FILES[path]
                self._send(200, (STATIC / name).read_bytes(), ctype)
            elif path == "/api/info":
                self._json(200, info(self.server.limits))
            elif path == "/api/examples":
                self._json(200, {"examples": examples(self.server.examples_dir)})
            elif path.startswith("/api/examples/"):
                self._json(200, example(self.server.examples_dir, path[len("/api/examples/"):], self.server.limits))
            else:
                raise PlaygroundError(404, "error", f"no such page: {path}")
        except PlaygroundError as err:
            self._json(err.status, err.json())

    # --------------------------------------------------------------- POST
    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            self._check_origin()
            body = self._body()
            if path == "/api/highlight":
                from ..compiler.highlight import tokens
                source = body.get("source", "") if isinstance(body, dict) else ""
                self._json(200, {"tokens": tokens(source if isinstance(source, str) else "")})
            elif path == "/api/run":
                answer = self.server.runner.run(check_job(body, self.server.limits))
                status = 200 if answer.get("ok") else \
                    (500 if answer["error"].get("kind") == "internal error" else 400)
                self._json(status, answer)
            else:
                raise PlaygroundError(404, "error", f"no such endpoint: {path}")
        except PlaygroundError as err:
            self._json(err.status, err.json())
        except Exception as err:  # noqa: BLE001 - the server stays up
            self._json(500, PlaygroundError(500, "internal error", f"{type(err).__name__}: {err}").json())

    def _check_origin(self) -> None:
        """A page of another site may not post here (a browser sends its Origin); on a
        loopback address the Host must be a loopback name too (no DNS rebinding)."""
        if self.server.server_address[0] in _LOOPBACK:
            host = urlsplit("//" + (self.headers.get("Host") or "")).hostname
            if host not in _LOOPBACK:
                raise PlaygroundError(403, "error", f"requests for the host {host!r} are not accepted")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            raise PlaygroundError(403, "error", f"requests from {origin} are not accepted")

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise PlaygroundError(411, "error", "the request has no Content-Length")
        n = int(length)
        if n > self.server.limits.max_body:
            raise PlaygroundError(413, "limit", f"the request is {n:,} bytes, more than the playground's cap of "
                                  f"{self.server.limits.max_body:,} bytes", "use a smaller model or data")
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except (ValueError, RecursionError):
            raise PlaygroundError(400, "error", "the request is not JSON") from None

    def _json(self, status: int, obj: Any) -> None:
        try:
            body = json.dumps(obj, allow_nan=False)
        except ValueError:
            body = json.dumps(_finite(obj))
        self._send(status, body.encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        try:
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the page went away
            pass


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def serve(host: str = "127.0.0.1", port: int = 8765, *, limits: Limits | None = None,
          examples_dir: Path | None = None) -> PlaygroundServer:
    """A started-up server (not yet serving: call ``serve_forever``), its workers warming up."""
    server = PlaygroundServer((host, port), limits, examples_dir)
    server.runner.warm_up()
    return server
