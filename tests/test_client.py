from __future__ import annotations

import hmac
import time
from decimal import Decimal
from email.utils import formatdate
from typing import Any

import pytest
import requests
import responses

from invoice_worker import errors as e
from invoice_worker.client import (
    ProviderClient,
    error_for_response,
    parse_retry_after,
    sign,
    verify_signature,
)
from invoice_worker.devstack.embedded import free_port
from invoice_worker.models import parse_request
from invoice_worker.sandbox import Sandbox
from tests.conftest import KEY, SECRET, new_id, request_data

VECTOR = (
    "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba55b90815f20e2bb10f82c7a9e"
    "9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
)


def test_signature_matches_official_vector() -> None:
    assert sign(b'{"currency":"BTC","foreign_id":"123456"}', "AbCdEfG123456") == VECTOR


def test_client_signs_the_exact_bytes_it_sends() -> None:
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET)
    request = parse_request(request_data(amount="0.1"))
    with responses.RequestsMock() as mock:
        mock.post("https://api.example.com/api/v2/invoices/create", status=500, body="x")
        with pytest.raises(e.ProviderServerError):
            client.create_invoice(request)
        sent = mock.calls[0].request
    assert sent.body == request.to_body()
    assert sent.headers["X-Processing-Signature"] == sign(request.to_body(), SECRET)
    assert sent.headers["X-Processing-Key"] == KEY
    assert sent.headers["Content-Type"] == "application/json"


def test_create_against_sandbox(client: ProviderClient) -> None:
    request = parse_request(request_data(amount="0.1", timer=True))
    invoice = client.create_invoice(request)
    assert invoice.foreign_id == request.foreign_id
    assert invoice.amount == Decimal("0.1")
    assert invoice.status == "pending"
    assert invoice.fixed_at is not None
    assert invoice.release_at == invoice.fixed_at + 900
    assert invoice.url.startswith("https://")


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


@responses.activate
def test_tls_error_is_permanent() -> None:
    responses.post(
        "https://api.example.com/api/v2/invoices/create",
        body=requests.exceptions.SSLError("certificate verify failed"),
    )
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET)
    with pytest.raises(e.ProviderTLSError):
        client.create_invoice(parse_request(request_data()))


@pytest.mark.parametrize(
    "body",
    ["<html>oops</html>", '{"result": "ok"}', '{"data": {"id": 1}}', '{"data": {"id": 1, "url"'],
)
@responses.activate
def test_unusable_200_is_ambiguous_never_success(body: str) -> None:
    responses.post("https://api.example.com/api/v2/invoices/create", body=body, status=200)
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET)
    with pytest.raises(e.AmbiguousResponseError) as info:
        client.create_invoice(parse_request(request_data()))
    assert info.value.status == 200
    assert info.value.ambiguous


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
    raw = "<html>\n 502 Bad   Gateway</html>" + "x" * 1000
    html = error_for_response(502, raw, {})
    assert html.message.startswith("<html> 502 Bad Gateway")
    assert html.body is not None
    # Changed in the restructure (privacy.redact): the body is cut to 500 characters ("..."
    # included) and then its control characters are escaped, so the newline adds 3 characters.
    assert html.body == raw[:497].replace("\n", "\\x0a") + "..."
    assert len(html.body) == 503


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
