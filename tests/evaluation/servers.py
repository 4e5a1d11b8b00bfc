"""Local HTTP servers for the evaluation tests: a static file server (pinned downloads) and a judge that speaks
the OpenAI chat-completions protocol and answers deterministically from what it is sent.

The judge's rules (tests hand-compute their expectations from them):
- checklist protocol: ``correct`` is 1 exactly when every checklist line asks for "exactly one ..." (every object
  has count 1 and there is no exclusion line); the reason lists the lines;
- imagine protocol: the scores are ``imagine_scores[instruction]`` (default 5, 5, 5);
- with ``malformed_first``, the first reply for each (image, protocol) is malformed (no JSON object, or a
  missing score line), the next ones well formed;
- ``statuses``: HTTP statuses to answer first, one per request, before any normal reply (429, 500, ...).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def _running(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def serve_files(files: dict[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """Serve ``files`` (URL path -> bytes) on 127.0.0.1; yields the base URL and the list of paths fetched."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body if body is not None else b"not found")

        def log_message(self, *args):
            pass

    with _running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url, hits


@dataclass
class JudgeLog:
    """What the fake judge saw: one entry per request (protocol, image sha256, instruction, status answered)."""

    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    held: int = 0
    max_in_flight: int = 0

    def count(self, **match) -> int:
        with self.lock:
            return sum(all(r.get(k) == v for k, v in match.items()) for r in self.requests)


def _checklist_answer(user_text: str) -> dict:
    lines = re.findall(r"^\d+\. (.*)$", user_text.split("Checklist:", 1)[1], re.M)
    ok = bool(lines) and all(line.startswith("exactly one ") for line in lines)
    return {"correct": 1 if ok else 0, "reason": "; ".join(lines)}


@contextmanager
def judge_server(*, imagine_scores: dict[str, tuple[int, int, int]] | None = None, malformed_first: bool = False,
                 statuses: list[int] | None = None, api_key: str | None = None,
                 meet: int = 0, hold_after: int | None = None,
                 release: threading.Event | None = None) -> Iterator[tuple[str, JudgeLog]]:
    """Run the fake judge; yields its ``/v1`` base URL and its request log. With ``meet`` > 1, the first
    ``meet`` requests wait for each other (a barrier, 10 s at most) before answering: they were in flight at once.
    With ``hold_after`` = n, requests after the first n wait until ``release`` is set (an interrupted judge phase);
    they are logged when they arrive, with status ``held`` until answered."""
    log = JudgeLog()
    seen: set[tuple[str, str]] = set()
    pending = list(statuses or [])
    scores = imagine_scores or {}
    barrier = threading.Barrier(meet) if meet > 1 else None
    met = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with log.lock:
                log.in_flight += 1
                log.max_in_flight = max(log.max_in_flight, log.in_flight)
                wait = barrier is not None and met[0] < meet
                held = hold_after is not None and met[0] >= hold_after
                met[0] += 1
            try:
                if wait:
                    barrier.wait(timeout=10)
                if held:
                    with log.lock:
                        log.held += 1
                    release.wait(timeout=600)
                self._answer(body)
            finally:
                with log.lock:
                    log.in_flight -= 1

        def _answer(self, body: dict) -> None:
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if api_key is not None and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self._send(401, {"error": {"message": "Incorrect API key provided"}})
            parts = body["messages"][1]["content"]
            text = next(p["text"] for p in parts if p["type"] == "text")
            image = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
            assert image.startswith("data:image/png;base64,")
            kind = "checklist" if "Checklist:" in text else "imagine"
            instruction = re.search(r"^Instruction: (.*)$", text, re.M).group(1)
            digest = hashlib.sha256(image.encode()).hexdigest()
            with log.lock:
                status = pending.pop(0) if pending else 200
                first = (digest, kind) not in seen
                if status == 200:
                    seen.add((digest, kind))
                log.requests.append({"kind": kind, "image": digest, "instruction": instruction, "status": status,
                                     "model": body["model"]})
            if status != 200:
                return self._send(status, {"error": {"message": f"answering {status} as told"}})
            if kind == "checklist":
                reply = "I believe the image is fine." if malformed_first and first else json.dumps(
                    _checklist_answer(text))
            else:
                ff, ip, aq = scores.get(instruction, (5, 5, 5))
                full = (f"Fantasy Fulfillment: {ff}\nReason: fantasy {ff}.\n\nIdentity Preservation: {ip}\n"
                        f"Reason: identity {ip}.\n\nAesthetic Quality: {aq}\nReason: aesthetics {aq}.")
                reply = f"Fantasy Fulfillment: {ff}\nReason: fantasy {ff}." if malformed_first and first else full
            self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": reply}}]})

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with _running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield f"{url}/v1", log
