"""providers.http.JSONClient against a real local HTTP server (pytest-httpserver)."""

from __future__ import annotations

import email.utils
import logging
import socket
import time

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from ftplan.providers.errors import AuthError, CapacityError, ProviderError
from ftplan.providers.http import APIError, JSONClient, parse_retry_after

KEY = "http-client-secret-key-31415926"


@pytest.fixture(scope="module")
def server():
    srv = HTTPServer(host="127.0.0.1", port=0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    server.clear()
    return server


def _client(base: str, delays: list[float] | None = None, **kw) -> JSONClient:
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff_s", 1.0)
    return JSONClient(base, KEY, provider="acme", credential_env="ACME_API_KEY",
                      credential_url="https://acme.example/keys",
                      sleep=(delays.append if delays is not None else (lambda s: None)), **kw)


def _sequence(server, method: str, path: str, responses: list[Response]) -> None:
    for r in responses:
        server.expect_ordered_request(path, method=method).respond_with_response(r)


def test_bearer_auth_and_json(http):
    http.expect_request("/v1/things", method="GET", headers={"Authorization": f"Bearer {KEY}"},
                        query_string="limit=2").respond_with_json({"items": [1, 2]})
    assert _client(http.url_for("/v1")).get("/things", params={"limit": 2}) == {"items": [1, 2]}


def test_get_retries_5xx_with_growing_backoff(http):
    _sequence(http, "GET", "/x", [Response("", 500), Response("", 502), Response('{"ok": 1}', 200)])
    delays: list[float] = []
    assert _client(http.url_for(""), delays).get("/x") == {"ok": 1}
    assert len(delays) == 2
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # 1 s, 2 s, each with jitter


def test_retry_after_seconds_and_http_date_are_honoured_and_capped(http):
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    _sequence(http, "GET", "/r", [Response("", 429, headers={"Retry-After": "7"}),
                                  Response("", 503, headers={"Retry-After": date}),
                                  Response("", 429, headers={"Retry-After": "9999"}),
                                  Response("[]", 200)])
    delays: list[float] = []
    assert _client(http.url_for(""), delays, max_backoff_s=60).get("/r") == []
    assert delays[0] == 7.0
    assert 15 <= delays[1] <= 20
    assert delays[2] == 60.0


def test_retries_are_bounded(http):
    http.expect_request("/down").respond_with_response(Response('{"message": "maintenance"}', 503))
    with pytest.raises(APIError) as err:
        _client(http.url_for(""), [], max_retries=2).get("/down")
    assert err.value.status == 503 and "maintenance" in str(err.value)
    assert len(http.log) == 3


def test_post_is_not_retried_after_a_5xx_but_is_after_429(http):
    http.expect_ordered_request("/launch", method="POST").respond_with_response(Response("", 500))
    with pytest.raises(APIError):
        _client(http.url_for(""), []).post("/launch", json={"n": 1})
    assert len(http.log) == 1

    http.clear()
    _sequence(http, "POST", "/launch", [Response("", 429, headers={"Retry-After": "1"}), Response('{"id": 1}')])
    assert _client(http.url_for(""), []).post("/launch", json={"n": 1}) == {"id": 1}
    assert [r.get_json() for r, _ in http.log] == [{"n": 1}, {"n": 1}]


def test_idempotent_post_is_retried(http):
    _sequence(http, "POST", "/terminate", [Response("", 502), Response('{"done": true}')])
    assert _client(http.url_for(""), []).post("/terminate", json={}, idempotent=True) == {"done": True}


def test_unreachable_server_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    delays: list[float] = []
    with pytest.raises(ProviderError, match="cannot reach"):
        _client(f"http://127.0.0.1:{port}", delays, max_retries=2).get("/x")
    assert len(delays) == 2


def test_timeout_on_post_says_it_may_have_been_applied(http):
    def slow(request):
        time.sleep(0.6)
        return Response("{}")

    http.expect_request("/launch").respond_with_handler(slow)
    with pytest.raises(ProviderError, match="may have been applied"):
        _client(http.url_for(""), [], timeout_s=0.2).post("/launch", json={})
    assert len(http.log) <= 1


def test_auth_errors_name_the_credential_and_never_show_the_key(http, caplog):
    caplog.set_level(logging.DEBUG)
    http.expect_request("/me").respond_with_json({"error": {"code": "bad-key", "message": f"key {KEY} unknown"}},
                                                 status=401)
    with pytest.raises(AuthError) as err:
        _client(http.url_for("")).get("/me")
    msg = str(err.value)
    assert "ACME_API_KEY" in msg and "https://acme.example/keys" in msg
    assert KEY not in msg and KEY not in caplog.text
    with pytest.raises(AuthError, match="set ACME_API_KEY"):
        JSONClient(http.url_for(""), "", provider="acme", credential_env="ACME_API_KEY", credential_url="u")


def test_error_mapper_and_non_json_answers(http):
    http.expect_request("/cap").respond_with_json({"code": "NO_ROOM", "message": "full"}, status=400)
    http.expect_request("/html").respond_with_data("<html>ok</html>", content_type="text/html")
    client = _client(http.url_for(""), error_mapper=lambda s, c, m: CapacityError if c == "NO_ROOM" else None)
    with pytest.raises(CapacityError, match="NO_ROOM: full"):
        client.get("/cap")
    with pytest.raises(ProviderError, match="non-JSON"):
        client.get("/html")


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after(email.utils.formatdate(1000, usegmt=True), now=990.0) == pytest.approx(10.0)
    assert parse_retry_after(email.utils.formatdate(1000, usegmt=True), now=2000.0) == 0.0
