"""What every fake provider API shares: a real werkzeug HTTP server on 127.0.0.1:<free port> in a daemon thread.

    class FakeX(FakeServer):
        def __init__(self):
            self._listen("fake-x")                  # binds now: `.port` and `.root_url` are known before start()
        def dispatch(self, request: Request) -> Response: ...

    fake = FakeX().start(); ...; fake.stop()

A fake that serves a whole WSGI app (moto) passes `app=` (and its own request handler). Each fake records
requests in its own shape, because tests assert what the adapter sent in that provider's terms.

`FakeCloudAPI` adds what the stateful provider fakes (Lambda, Paperspace, RunPod) share: one running server
per class and test process (`shared()`; starting and stopping one per test costs time), armed faults
(`fail_next(op, kind, times)`), a lock around state, and public views of records whose `_keys` are private.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # one stderr line per request drowns test output
        pass


class FakeServer:
    def _listen(self, name: str, app: Callable | None = None,
                handler: type[WSGIRequestHandler] = QuietHandler) -> None:
        self._server = make_server("127.0.0.1", 0, app or self._wsgi, threaded=True, request_handler=handler)
        self.port: int = self._server.server_address[1]
        self.root_url = f"http://127.0.0.1:{self.port}"
        # A short poll interval: shutdown() waits for it, and fakes are stopped after every test module.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True, name=name)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)

    def _wsgi(self, environ, start_response):
        return self.dispatch(Request(environ))(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        raise NotImplementedError


_running: dict[type, FakeCloudAPI] = {}


class FakeCloudAPI(FakeServer):
    default_api_key: ClassVar[str]
    api_prefix: ClassVar[str] = ""  # the path the adapter's base URL ends with
    fault_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, api_key: str | None = None, *, ssh_host: str = "127.0.0.1") -> None:
        self.api_key = api_key or self.default_api_key
        self.ssh_host = ssh_host  # the address new machines report (a local sshd in end-to-end tests)
        self._lock = threading.RLock()
        self._listen(f"fake-{type(self).__name__}")
        self.reset()

    @property
    def url(self) -> str:
        """The base URL to give the adapter."""
        return self.root_url + self.api_prefix

    @classmethod
    def shared(cls):
        """The one running instance of this fake in this test process (state as the last test left it)."""
        if cls not in _running:
            _running[cls] = cls().start()
        return _running[cls]

    @classmethod
    def fresh(cls):
        """The shared instance with fresh state, its machines reachable at 127.0.0.1 (what fixtures give)."""
        fake = cls.shared()
        fake.reset()
        fake.ssh_host = "127.0.0.1"
        return fake

    def reset(self) -> None:
        self.faults: list[list[Any]] = []  # [op, kind, remaining]

    def fail_next(self, op: str, kind: str = "500", times: int = 1) -> None:
        assert kind in self.fault_kinds, kind
        self.faults.append([op, kind, times])

    def _take_fault(self, op: str) -> str | None:
        """The kind of an armed fault for `op` (using one of its times), or None."""
        for f in self.faults:
            if f[0] == op and f[2] > 0:
                f[2] -= 1
                return f[1]
        return None

    @staticmethod
    def _public(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith("_")}
