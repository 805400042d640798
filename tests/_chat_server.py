"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, scripted per request.

    with ChatServer() as srv:                      # srv.base_url == "http://127.0.0.1:PORT/v1"
        srv.push(Reply.error(500), Reply.caption(GOOD))
        ...                                        # a client POSTs /v1/chat/completions
        srv.requests                               # what it got: path, headers, JSON body
        srv.max_in_flight                          # most requests it was answering at once

Each request takes the next scripted :class:`Reply`; with the script empty, ``responder(request)`` answers (by
default a valid caption, :data:`GOOD`). :func:`closed_port_url` is the URL of a server that is down.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

#: A valid caption (CaptionSchema JSON): one span, a red circle moving left slowly.
GOOD = {
    "spans": [{"start": 0, "end": 0, "subjects": [{"type": "object", "shape": "circle", "colour": "red",
                                                   "appearance": None, "action": "moving", "direction": "left",
                                                   "speed": "slow", "position": None}],
               "interaction": None, "camera_motion": None, "camera_speed": None}],
    "background": "plain", "environment": None, "shot_type": None, "lighting": None, "style": None,
}


@dataclass
class Reply:
    """One scripted answer: an HTTP ``status``; for 200 the assistant's ``content`` in a chat completion (or a raw
    ``body``), else an OpenAI-style error; extra ``headers``; ``delay`` seconds before answering."""

    status: int = 200
    content: Optional[str] = None
    body: Optional[bytes] = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def text(cls, content: str, delay: float = 0.0) -> "Reply":
        return cls(content=content, delay=delay)

    @classmethod
    def caption(cls, doc: dict = GOOD, delay: float = 0.0) -> "Reply":
        return cls(content=json.dumps(doc), delay=delay)

    @classmethod
    def error(cls, status: int, message: str = "scripted failure", retry_after: Optional[str] = None) -> "Reply":
        body = json.dumps({"error": {"message": message, "type": "test_error", "code": status}}).encode()
        return cls(status=status, body=body, headers={} if retry_after is None else {"Retry-After": retry_after})


@dataclass
class Request:
    """A request the server got: its path, headers (lower-case names) and JSON body."""

    path: str
    headers: dict
    body: dict

    @property
    def image_urls(self) -> list[str]:
        """The ``image_url`` URLs of the user messages, in order."""
        return [part["image_url"]["url"] for m in self.body.get("messages", []) if m.get("role") == "user"
                and isinstance(m.get("content"), list) for part in m["content"] if part.get("type") == "image_url"]

    def images(self) -> list:
        """The images of :attr:`image_urls` decoded (PIL images)."""
        from PIL import Image

        out = []
        for url in self.image_urls:
            head, data = url.split(",", 1)
            assert head.startswith("data:image/") and head.endswith(";base64"), head
            out.append(Image.open(io.BytesIO(base64.b64decode(data, validate=True))))
        return out


class ChatServer:
    """See the module docstring. ``responder(request) -> Reply`` answers when the script is empty."""

    def __init__(self, responder: Optional[Callable[[Request], Reply]] = None):
        self.responder = responder or (lambda req: Reply.caption())
        self.script: deque = deque()
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def push(self, *replies: Reply) -> "ChatServer":
        self.script.extend(replies)
        return self

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()   # cuts every delay short
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            scripted = self.script.popleft() if self.script else None
        return scripted if scripted is not None else self.responder(req)

    def _handler(self):
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                reply = srv._answer(req)
                try:
                    if reply.delay:
                        srv._stop.wait(reply.delay)
                    if self.path != "/v1/chat/completions":
                        reply = Reply.error(404, f"no route {self.path}")
                    data = reply.body
                    if data is None:
                        data = json.dumps({
                            "id": f"chatcmpl-{len(srv.requests)}", "object": "chat.completion",
                            "created": int(time.time()), "model": body.get("model", ""),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        }).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (its timeout)
                    pass
                finally:
                    with srv._lock:
                        srv.in_flight -= 1

        return Handler


def closed_port_url() -> str:
    """The base URL of a server that is down: a port just bound and closed, so connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
