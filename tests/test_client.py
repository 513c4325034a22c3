from __future__ import annotations

import hmac
import json
import time
import tracemalloc
from decimal import Decimal
from email.utils import formatdate
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from invoice_worker import errors as e
from invoice_worker.answers import error_for_response, parse_retry_after
from invoice_worker.client import ProviderClient, sign, verify_signature
from invoice_worker.devstack.embedded import free_port
from invoice_worker.models import parse_request
from invoice_worker.sandbox import Sandbox
from tests.conftest import KEY, SECRET, new_id, request_data
from tests.rawhttp import (
    Canned,
    Handler,
    RawServer,
    canned_session,
    gzip_bomb,
    huge,
    invoice_data,
)

VECTOR = (
    "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba55b90815f20e2bb10f82c7a9e"
    "9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
)


def test_signature_matches_official_vector() -> None:
    assert sign(b'{"currency":"BTC","foreign_id":"123456"}', "AbCdEfG123456") == VECTOR


def test_client_signs_the_exact_bytes_it_sends() -> None:
    session = canned_session(lambda request: Canned(500, b"x"))
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET, session=session)
    request = parse_request(request_data(amount="0.1"))
    with pytest.raises(e.ProviderServerError):
        client.create_invoice(request)
    sent = session.adapter.sent[0]  # type: ignore[attr-defined]
    assert sent.url == "https://api.example.com/api/v2/invoices/create"
    assert sent.body == request.to_body()
    assert sent.headers["X-Processing-Signature"] == sign(request.to_body(), SECRET)
    assert sent.headers["X-Processing-Key"] == KEY
    assert sent.headers["Content-Type"] == "application/json"


def test_create_against_sandbox(client: ProviderClient, sandbox: Sandbox) -> None:
    request = parse_request(request_data(amount="0.1", timer=True))
    invoice = client.create_invoice(request)
    assert invoice.foreign_id == request.foreign_id
    assert invoice.amount == Decimal("0.1")
    assert invoice.status == "pending"
    assert invoice.fixed_at is not None
    assert invoice.release_at == invoice.fixed_at + 900
    # The sandbox's invoice page is on plain http on loopback: accepted from a loopback API only.
    assert invoice.url.startswith(f"{sandbox.origin}/invoice/")


def test_create_without_timer_is_created(client: ProviderClient) -> None:
    invoice = client.create_invoice(parse_request(request_data(timer=False)))
    assert invoice.status == "created"


def test_repr_hides_credentials(client: ProviderClient) -> None:
    assert SECRET not in repr(client)
    assert KEY not in repr(client)


def test_bad_secret_is_auth_error(sandbox: Sandbox) -> None:
    client = ProviderClient(sandbox.url, KEY, "wrong-secret")
    with pytest.raises(e.ProviderAuthError) as info:
        client.create_invoice(parse_request(request_data()))
    assert info.value.status == 403
    assert info.value.provider_code == "bad_header_signature"
    assert not info.value.retryable


def test_bad_key_is_auth_error(sandbox: Sandbox) -> None:
    client = ProviderClient(sandbox.url, "other-key", SECRET)
    with pytest.raises(e.ProviderAuthError) as info:
        client.create_invoice(parse_request(request_data()))
    assert info.value.provider_code == "bad_header_key"


def test_field_errors_kept(client: ProviderClient) -> None:
    with pytest.raises(e.ProviderValidationError) as info:
        client.create_invoice(parse_request(request_data(amount="0.00001")))
    assert info.value.errors == {
        "amount": "The amount is too small. The minimum amount is 10.00 EUR."
    }
    assert info.value.to_dict()["error_code"] == "validation_error"


def test_duplicate_foreign_id_has_its_own_class(client: ProviderClient) -> None:
    request = parse_request(request_data())
    client.create_invoice(request)
    with pytest.raises(e.DuplicateForeignIdError) as info:
        client.create_invoice(request)
    assert info.value.errors == {"foreign_id": "The foreign id has already been taken."}
    assert isinstance(info.value, e.PermanentProviderError)


def test_cancel(client: ProviderClient) -> None:
    request = parse_request(request_data())
    client.create_invoice(request)
    cancelled = client.cancel_invoice(request.foreign_id)
    assert cancelled.status == "failed"
    with pytest.raises(e.InvoiceStateError) as info:
        client.cancel_invoice(request.foreign_id)
    assert info.value.provider_code == "invalid_invoice_state"
    with pytest.raises(e.InvoiceNotFoundError):
        client.cancel_invoice(new_id())


def test_ping(client: ProviderClient) -> None:
    assert client.ping()
    assert not ProviderClient(f"http://127.0.0.1:{free_port()}/api/v2", KEY, SECRET).ping()


@pytest.mark.parametrize(
    ("outcome", "cls", "ambiguous", "created"),
    [
        ("500", e.ProviderServerError, True, False),
        ("502", e.ProviderServerError, True, False),
        ("503", e.ProviderServerError, True, False),
        ("429", e.RateLimitedError, False, False),
        ("429_bare", e.RateLimitedError, False, False),
        ("commit_then_502", e.ProviderServerError, True, True),
        ("commit_then_drop", e.AmbiguousResponseError, True, True),
    ],
)
def test_faults_map_to_transient_classes(
    client: ProviderClient,
    sandbox: Sandbox,
    outcome: str,
    cls: type[e.TransientProviderError],
    ambiguous: bool,
    created: bool,
) -> None:
    request = parse_request(request_data())
    sandbox.script([outcome], foreign_id=request.foreign_id)
    with pytest.raises(cls) as info:
        client.create_invoice(request)
    assert info.value.retryable
    assert info.value.ambiguous is ambiguous
    made = [i for i in sandbox.invoices() if i["foreign_id"] == request.foreign_id]
    assert len(made) == (1 if created else 0)


def test_429_retry_after_seconds(client: ProviderClient, sandbox: Sandbox) -> None:
    request = parse_request(request_data())
    sandbox.script(["429"], foreign_id=request.foreign_id)
    with pytest.raises(e.RateLimitedError) as info:
        client.create_invoice(request)
    assert info.value.retry_after == pytest.approx(sandbox.faults.retry_after)
    sandbox.script(["429_bare"], foreign_id=request.foreign_id)
    with pytest.raises(e.RateLimitedError) as bare:
        client.create_invoice(request)
    assert bare.value.retry_after is None
    assert bare.value.message == "error code: 1015"


def test_read_timeout_is_ambiguous(sandbox: Sandbox) -> None:
    client = ProviderClient(sandbox.url, KEY, SECRET, read_timeout=0.3)
    request = parse_request(request_data())
    sandbox.script(["timeout"], foreign_id=request.foreign_id)
    started = time.monotonic()
    with pytest.raises(e.AmbiguousResponseError) as info:
        client.create_invoice(request)
    assert time.monotonic() - started < 5
    assert info.value.ambiguous


def test_connection_refused_is_not_ambiguous() -> None:
    client = ProviderClient(f"http://127.0.0.1:{free_port()}/api/v2", KEY, SECRET)
    with pytest.raises(e.ProviderConnectionError) as info:
        client.create_invoice(parse_request(request_data()))
    assert info.value.retryable
    assert not info.value.ambiguous
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_tls_error_before_sending_is_permanent() -> None:
    def handshake_fails(request: requests.PreparedRequest) -> Canned:
        raise requests.exceptions.SSLError("certificate verify failed")

    session = canned_session(handshake_fails)
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET, session=session)
    with pytest.raises(e.ProviderTLSError):
        client.create_invoice(parse_request(request_data()))


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b'{"result": "ok"}',
        b'{"data": {"id": 1}}',
        b'{"data": {"id": 1, "url"',
        b'{"data": null}',
        b"[1]",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the JSON parser recurses
        b'{"data": ' * 50_000 + b"{}" + b"}" * 50_000,
    ],
)
def test_unusable_200_is_ambiguous_never_success(body: bytes) -> None:
    session = canned_session(lambda request: Canned(200, body))
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET, session=session)
    with pytest.raises(e.AmbiguousResponseError) as info:
        client.create_invoice(parse_request(request_data()))
    assert info.value.status == 200
    assert info.value.ambiguous
    assert len(info.value.message) < 300


# The retry predicate as a table over status codes (stripe's test_should_retry_on_codes).
@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, '{"error":"Bad content format","code":"bad_content_format"}',
         e.PermanentProviderError),
        (400, '{"errors":{"title":"The title field is required."}}', e.ProviderValidationError),
        (400, '{"errors":{"foreign_id":"The foreign id has already been taken."}}',
         e.DuplicateForeignIdError),
        (400, '{"errors":{"error":"Invoice cannot be failed in its current state.",'
              '"code":"invalid_invoice_state"}}', e.InvoiceStateError),
        (403, '{"error":"No key header","code":"required_header_key"}', e.ProviderAuthError),
        (404, "not found", e.InvoiceNotFoundError),
        (408, "", e.ProviderServerError),
        (409, "conflict", e.PermanentProviderError),
        (429, "error code: 1015", e.RateLimitedError),
        (500, "", e.ProviderServerError),
        (502, "<html><body>502 Bad Gateway</body></html>", e.ProviderServerError),
        (503, '{"error":"maintenance"}', e.ProviderServerError),
        (504, "", e.ProviderServerError),
        (302, "", e.TransientProviderError),
    ],
)  # fmt: skip
def test_status_mapping(status: int, body: str, cls: type[e.ProviderError]) -> None:
    error = error_for_response(status, body, {})
    assert type(error) is cls
    assert error.status == status
    assert error.retryable is (status in (302, 408, 429) or status >= 500)


def test_error_shapes_parsed() -> None:
    auth = error_for_response(403, '{"error":"Bad key header","code":"bad_header_key"}', {})
    assert (auth.message, auth.provider_code) == ("Bad key header", "bad_header_key")
    state = error_for_response(
        400, '{"errors":{"error":"Invoice cannot be failed.","code":"invalid_invoice_state"}}', {}
    )
    assert (state.message, state.provider_code, state.errors) == (
        "Invoice cannot be failed.", "invalid_invoice_state", {}
    )  # fmt: skip
    fields = error_for_response(400, '{"errors":{"title":["too long","bad"]}}', {})
    assert fields.errors == {"title": "too long bad"}
    html = error_for_response(502, "<html>\n 502 Bad   Gateway</html>" + "x" * 1000, {})
    assert html.message.startswith("<html> 502 Bad Gateway")
    assert html.body is not None
    # Bounded to 500 characters, then control characters shown escaped (the newline: 4 more).
    assert len(html.body) == 503
    assert "\n" not in html.body


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert later is not None
    assert 28 <= later <= 31
    assert parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_retry_after_header_http_date() -> None:
    date = formatdate(time.time() + 10, usegmt=True)
    error = error_for_response(429, "slow down", {"Retry-After": date})
    assert isinstance(error, e.RateLimitedError)
    assert error.retry_after is not None
    assert 8 <= error.retry_after <= 11


def test_provider_error_repr_has_no_body() -> None:
    error = error_for_response(400, '{"errors":{"email_user":"bad a@b.example"}}', {})
    assert "a@b.example" not in repr(error)


def test_verify_signature_on_raw_bytes() -> None:
    body = b'{"currency":"BTC","foreign_id":"123456"}'
    assert verify_signature(body, VECTOR, "AbCdEfG123456")
    assert verify_signature(body, VECTOR.upper() + "\n", "AbCdEfG123456")
    assert not verify_signature(body.replace(b":", b": "), VECTOR, "AbCdEfG123456")
    assert not verify_signature(body, VECTOR[:-1] + "0", "AbCdEfG123456")
    assert not verify_signature(body, "", "AbCdEfG123456")


def test_signature_checks_are_constant_time(
    monkeypatch: pytest.MonkeyPatch, client: ProviderClient
) -> None:
    # Both our callback check and the sandbox go through hmac.compare_digest.
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((type(a).__name__, type(b).__name__))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    verify_signature(b"{}", "00", "s")
    client.create_invoice(parse_request(request_data()))
    assert len(calls) == 3  # ours, then the sandbox: key and signature


def test_environment_read_once_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/shop/ca.pem")
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET)
    monkeypatch.delenv("HTTPS_PROXY")
    # A proxy configured at start keeps applying; requests no longer re-reads the environment.
    assert client.session.proxies == {"https": "http://proxy.example.com:3128"}
    assert client.session.verify == "/etc/shop/ca.pem"
    assert client.session.trust_env is False


# --- The transport seam (issue 11): a caller's session is used as is. ---


def test_a_given_session_is_used_as_is() -> None:
    session = canned_session(lambda request: Canned(500, b"x"))
    session.headers["X-Shop"] = "kept"
    adapters = dict(session.adapters)
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET, session=session)
    assert client.session is session
    with pytest.raises(e.ProviderServerError):
        client.create_invoice(parse_request(request_data()))
    assert session.adapters == adapters  # nothing mounted over the caller's transport
    sent = session.adapter.sent[0]  # type: ignore[attr-defined]
    assert sent.headers["X-Shop"] == "kept"
    assert sent.headers["User-Agent"] == "invoice-worker"  # ours ride on each request instead
    client.close()
    assert session.adapters == adapters  # and close() leaves the caller's session alone


@pytest.mark.parametrize(
    "retries",
    [1, Retry(total=2), Retry(total=None, connect=1, read=0, status=0, other=0), Retry(None)],
)
def test_a_given_session_that_retries_is_refused(retries: int | Retry) -> None:
    # A silent urllib3 retry of a sent POST could create a second invoice.
    session = requests.Session()
    session.mount("https://", HTTPAdapter(max_retries=retries))
    with pytest.raises(ValueError, match="retries"):
        ProviderClient("https://api.example.com/api/v2", KEY, SECRET, session=session)


def test_a_plain_session_is_accepted(sandbox: Sandbox) -> None:
    with requests.Session() as session:
        client = ProviderClient(sandbox.url, KEY, SECRET, session=session)
        request = parse_request(request_data())
        assert client.create_invoice(request).foreign_id == request.foreign_id


# --- Hostile or broken 200 answers (issue 10 item 6). ---


def answering(api_url: str, **changes: Any) -> ProviderClient:
    """A client whose provider answers every create with a correct invoice, then ``changes``."""

    def handler(request: requests.PreparedRequest) -> Canned:
        assert isinstance(request.body, bytes)
        return Canned(200, json.dumps({"data": invoice_data(request.body, **changes)}).encode())

    return ProviderClient(api_url, KEY, SECRET, session=canned_session(handler))


HTTPS_API = "https://api.example.com/api/v2"
BAD_URLS = [
    "javascript:alert(document.cookie)",
    "JavaScript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "http://invoices.sandbox.cryptoprocessing.com/invoice/6rKzdo",
    "ftp://invoices.example.com/i",
    "//invoices.example.com/i",
    "https:///invoice/6rKzdo",
    "https://invoices.example.com/in voice",
    "https://invoices.example.com/i\n<script>",
    "\thttps://invoices.example.com/i",
    "https://invoices.example.com/i\x00",
    "https://invoices.example.com/i\x7f",
    "https://invoices.example.com/\u202eoi",  # right-to-left override
    "https://invoices.example.com/\u200bi",  # zero-width space
    "https://invoices.example.com@evil.example/i",
    "https://user:pass@invoices.example.com/i",
    "https://[::1/i",
    "https://invoices.example.com:99999/i",
    "https://invoices.example.com/" + "a" * 2030,
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_create_answer_with_a_bad_url_is_ambiguous(url: str) -> None:
    client = answering(HTTPS_API, url=url)
    with pytest.raises(e.AmbiguousResponseError) as info:
        client.create_invoice(parse_request(request_data()))
    assert "url" in info.value.message
    assert url.strip() not in info.value.message  # named, never echoed
    assert len(info.value.message) < 300


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"foreign_id": "order-someone-else"}, "foreign_id"),
        ({"foreign_id": 123456}, "foreign_id"),
        ({"amount": "0.01240000"}, "amount"),
        ({"amount": "0.0123000000001"}, "amount"),
        ({"amount": "1E+999999999"}, "amount"),
        ({"amount": "-0.0123"}, "amount"),
        ({"currency": "ETH"}, "currency"),
        ({"currency": "btc"}, "currency"),
    ],
)
def test_create_answer_that_disagrees_is_ambiguous(changes: dict[str, Any], field: str) -> None:
    client = answering(HTTPS_API, **changes)
    with pytest.raises(e.AmbiguousResponseError) as info:
        client.create_invoice(parse_request(request_data(amount="0.0123", currency="BTC")))
    assert field in info.value.message
    assert info.value.status == 200
    assert info.value.ambiguous


def test_several_disagreements_are_all_named() -> None:
    client = answering(HTTPS_API, foreign_id="x", url="javascript:1", currency="ETH")
    with pytest.raises(e.AmbiguousResponseError) as info:
        client.create_invoice(parse_request(request_data()))
    for field in ("foreign_id", "url", "currency"):
        assert field in info.value.message


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"amount": "0.01230000"},  # the provider's 8-decimal formatting
        {"amount": "0.0123"},
        {"amount": 0.0123},
        {"url": "HTTPS://Invoices.Example.com/invoice/6rKzdo"},
        {"url": "https://invoices.example.com/" + "a" * 2019},  # exactly 2048 characters
    ],
)
def test_create_answer_that_agrees_is_accepted(changes: dict[str, Any]) -> None:
    client = answering(HTTPS_API, **changes)
    request = parse_request(request_data(amount="0.0123"))
    invoice = client.create_invoice(request)
    assert invoice.foreign_id == request.foreign_id


def test_integer_foreign_id_of_older_api_versions_is_accepted() -> None:
    client = answering(HTTPS_API, foreign_id=987654)
    invoice = client.create_invoice(parse_request(request_data(foreign_id="987654")))
    assert invoice.foreign_id == "987654"


@pytest.mark.parametrize(
    ("api_url", "accepted"),
    [
        ("http://127.0.0.1:8080/api/v2", True),
        ("http://localhost:8080/api/v2", True),
        ("http://[::1]:8080/api/v2", True),
        ("http://provider.example.com/api/v2", False),
        ("http://10.0.0.7/api/v2", False),
        ("https://127.0.0.1:8443/api/v2", False),
    ],
)
def test_plain_http_invoice_url_only_from_a_local_http_provider(
    api_url: str, accepted: bool
) -> None:
    client = answering(api_url, url="http://127.0.0.1:8080/invoice/6rKzdo")
    request = parse_request(request_data())
    if accepted:
        assert client.create_invoice(request).url.startswith("http://")
    else:
        with pytest.raises(e.AmbiguousResponseError, match="url"):
            client.create_invoice(request)


def test_cancel_answer_naming_another_invoice_is_ambiguous() -> None:
    client = answering(HTTPS_API, foreign_id="order-someone-else", status="failed")
    with pytest.raises(e.AmbiguousResponseError, match="foreign_id"):
        client.cancel_invoice("order-mine")


def test_cancel_answer_is_not_held_to_the_create_rules() -> None:
    # A cancel answer's url and amount are not used: only the foreign_id is checked.
    client = answering(HTTPS_API, foreign_id="order-mine", status="failed", url="javascript:1")
    assert client.cancel_invoice("order-mine").status == "failed"


def test_create_against_sandbox_passes_the_checks(client: ProviderClient) -> None:
    for amount in ("0.0123", "0.01230000", "1", "12.5"):
        request = parse_request(request_data(amount=amount))
        assert client.create_invoice(request).amount == Decimal(amount)


# --- Error bodies stay bounded before any parsing or masking. ---


def test_error_fields_are_bounded() -> None:
    huge = "x" * 200_000
    body = json.dumps(
        {"error": huge, "code": huge, "errors": {f"f{i}": [huge, huge] for i in range(1000)}}
    )
    error = error_for_response(400, body, {})
    assert len(error.message) <= 500
    assert error.provider_code is not None
    assert len(error.provider_code) <= 100
    assert len(error.errors) <= 20
    assert all(len(k) <= 100 and len(v) <= 500 for k, v in error.errors.items())
    assert error.body is not None
    assert len(error.body) <= 500


def test_error_body_nested_too_deep_is_mapped_by_status() -> None:
    error = error_for_response(400, "[" * 100_000, {})
    assert type(error) is e.PermanentProviderError
    odd = error_for_response(400, '{"error": {"a": [1]}, "code": [2], "errors": [3]}', {})
    assert type(odd) is e.PermanentProviderError


# --- Answers are read with a size cap (issue 10 item 6). ---

MIB = 1 << 20


def read_with_peak(client: ProviderClient, server: RawServer) -> tuple[BaseException, int]:
    """Create once against ``server``; return the error raised and the peak traced memory."""
    request = parse_request(request_data())
    tracemalloc.start()
    try:
        with pytest.raises(e.ProviderError) as info:
            client.create_invoice(request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info.value, peak


@pytest.mark.parametrize(
    "handler",
    [huge(200, 50 * MIB), huge(200, 0, chunked=True), gzip_bomb(50 * MIB)],
    ids=["50MB", "endless-chunked", "gzip-bomb"],
)
def test_huge_200_answer_is_ambiguous_and_not_read_whole(handler: Handler) -> None:
    with RawServer(handler) as server:
        client = ProviderClient(server.url(), KEY, SECRET, read_timeout=10)
        error, peak = read_with_peak(client, server)
        client.close()
    assert type(error) is e.AmbiguousResponseError
    assert error.status == 200
    assert "1048576 bytes" in error.message
    assert peak < 8 * MIB
    assert server.bytes_sent < 20 * MIB  # the cap, plus what socket buffers hold


def test_huge_error_answer_is_mapped_by_status_with_the_body_truncated() -> None:
    with RawServer(huge(500, 50 * MIB)) as server:
        client = ProviderClient(server.url(), KEY, SECRET, read_timeout=10)
        error, peak = read_with_peak(client, server)
        client.close()
    assert type(error) is e.ProviderServerError
    assert error.status == 500
    assert error.body is not None
    assert len(error.body) <= 500
    assert peak < 8 * MIB
    assert server.bytes_sent < 20 * MIB


def test_max_response_bytes_is_the_cap(sandbox: Sandbox) -> None:
    small = ProviderClient(sandbox.url, KEY, SECRET, max_response_bytes=100)
    request = parse_request(request_data())
    with pytest.raises(e.AmbiguousResponseError, match="100 bytes"):
        small.create_invoice(request)
    assert sandbox.create_calls(request.foreign_id) == 1  # sent: the invoice exists
    body = json.dumps({"data": invoice_data(request.to_body())}).encode()
    exact = ProviderClient(
        HTTPS_API, KEY, SECRET, max_response_bytes=len(body),
        session=canned_session(lambda r: Canned(200, body)),
    )  # fmt: skip
    assert exact.create_invoice(request).foreign_id == request.foreign_id
    with pytest.raises(ValueError, match="max_response_bytes"):
        ProviderClient(HTTPS_API, KEY, SECRET, max_response_bytes=0)
