"""The exception tree: its drawing, the classes' contract, and how provider text is bounded."""

from __future__ import annotations

import inspect
import re

import pytest

from invoice_worker import errors as e
from invoice_worker.privacy import TEXT_LIMIT

CLASSES = [
    cls
    for _, cls in inspect.getmembers(e, inspect.isclass)
    if issubclass(cls, e.InvoiceWorkerError) and cls.__module__ == e.__name__
]
PROVIDER_CLASSES = [cls for cls in CLASSES if issubclass(cls, e.ProviderError)]
# A line of the drawing: box characters, then the class name (4 columns per level).
_TREE_LINE = re.compile(r"^(?P<indent> *(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Z]\w+)(?:\s|$)")


def drawn_tree() -> dict[str, str | None]:
    """Class name -> the parent drawn above it, from the module docstring."""
    doc = e.__doc__ or ""
    lines = doc.split("::", 1)[1].strip("\n").splitlines()
    root_column = len(lines[0]) - len(lines[0].lstrip())
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        match = _TREE_LINE.match(line)
        assert match, f"not a line of the tree: {line!r}"
        column = match.start("name")
        depth = 0 if column == root_column else (column - root_column) // 4
        del path[depth:]
        parents[match["name"]] = path[-1] if path else None
        path.append(match["name"])
    return parents


def test_the_walk_finds_the_whole_tree() -> None:
    # Guards the tests below: a broken discovery would make them pass on nothing.
    assert len(CLASSES) == 22
    assert {e.InvoiceWorkerError, e.DuplicateForeignIdError, e.ProviderTLSError} <= set(CLASSES)


def test_docstring_draws_every_class_under_its_real_parent() -> None:
    tree = drawn_tree()
    assert set(tree) == {cls.__name__ for cls in CLASSES}
    for cls in CLASSES:
        parent = tree[cls.__name__]
        if parent is None:
            assert cls is e.InvoiceWorkerError
        else:
            assert getattr(e, parent) in cls.__bases__, cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_class_has_a_raised_when_docstring_and_its_own_code(cls: type[Exception]) -> None:
    doc = cls.__dict__.get("__doc__")
    assert doc, f"{cls.__name__} has no docstring of its own"
    assert doc.startswith("Raised "), doc
    assert "code" in cls.__dict__, f"{cls.__name__} inherits its code"
    assert re.fullmatch(r"[a-z][a-z_]*", cls.code), cls.code  # type: ignore[attr-defined]


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in CLASSES]
    assert len(set(codes)) == len(codes)


# The docstring's tree: transient ones are retried; ``ambiguous`` where the request was sent
# and the invoice may exist.
RETRY_AND_AMBIGUITY = {
    e.ProviderError: (False, False),
    e.TransientProviderError: (True, False),
    e.ProviderConnectionError: (True, False),
    e.AmbiguousResponseError: (True, True),
    e.RateLimitedError: (True, False),
    e.ProviderServerError: (True, True),
    e.PermanentProviderError: (False, False),
    e.ProviderValidationError: (False, False),
    e.DuplicateForeignIdError: (False, False),
    e.ProviderAuthError: (False, False),
    e.InvoiceStateError: (False, False),
    e.InvoiceNotFoundError: (False, False),
    e.ProviderTLSError: (False, False),
}


def test_retry_table_covers_every_provider_class() -> None:
    assert set(RETRY_AND_AMBIGUITY) == set(PROVIDER_CLASSES)


@pytest.mark.parametrize(
    ("cls", "expected"), RETRY_AND_AMBIGUITY.items(), ids=lambda v: getattr(v, "__name__", "")
)
def test_retryable_and_ambiguous_by_class(
    cls: type[e.ProviderError], expected: tuple[bool, bool]
) -> None:
    error = cls("boom", status=500)
    assert (error.retryable, error.ambiguous) == expected
    # Celery's autoretry_for matches classes: the class decides, not the instance.
    assert issubclass(cls, e.TransientProviderError) is expected[0]


def test_invalid_request_is_a_value_error() -> None:
    assert issubclass(e.InvalidRequestError, ValueError)


def test_to_dict_prefers_the_providers_code() -> None:
    error = e.ProviderValidationError(
        "The given data was invalid.", status=400, errors={"title": "too long"}
    )
    assert error.to_dict() == {
        "error_code": "validation_error",
        "error": "The given data was invalid.",
        "http_status": 400,
        "errors": {"title": "too long"},
    }
    auth = e.ProviderAuthError("Bad key header", status=403, provider_code="bad_header_key")
    assert auth.to_dict()["error_code"] == "bad_header_key"
    assert e.ProviderConnectionError("refused").to_dict() == {
        "error_code": "connection_error",
        "error": "refused",
        "http_status": None,
        "errors": {},
    }


def test_rate_limited_keeps_retry_after_and_the_http_context() -> None:
    error = e.RateLimitedError("slow down", retry_after=2.5, status=429, body="error 1015")
    assert (error.retry_after, error.status, error.body) == (2.5, 429, "error 1015")
    assert e.RateLimitedError("slow down").retry_after is None


def test_provider_text_is_masked_and_escaped_everywhere() -> None:
    error = e.ProviderValidationError(
        "invalid: jane.doe@example.com\nFAKE LOG LINE",
        status=400,
        provider_code="code\rx",
        errors={"email_user": "jane.doe@example.com is taken", "bad\nfield": "x"},
        body='{"email_user":"jane.doe@example.com"}',
    )
    texts = [str(error), error.message, error.body, error.provider_code, repr(error)]
    texts += [*error.errors, *error.errors.values()]
    for text in texts:
        assert text is not None
        assert "jane.doe" not in text
        assert "\n" not in text
        assert "\r" not in text
    assert error.message == "invalid: ***\\x0aFAKE LOG LINE"
    assert error.errors == {"email_user": "*** is taken", "bad\\x0afield": "x"}


def test_repr_shows_status_and_message_only() -> None:
    error = e.ProviderServerError("bad gateway", status=502, body="<html>secret page</html>")
    assert repr(error) == "ProviderServerError(status=502, message='bad gateway')"


def test_provider_text_is_bounded() -> None:
    errors = {f"field{n}" + "k" * 200: "v" * 5000 for n in range(100)}
    error = e.ProviderError("m" * 5000, provider_code="c" * 5000, errors=errors, body="b" * 5000)
    assert len(error.message) == TEXT_LIMIT
    assert error.message.endswith("...")
    assert error.body is not None
    assert len(error.body) == TEXT_LIMIT
    assert error.provider_code is not None
    assert len(error.provider_code) == 100
    assert len(error.errors) == e.MAX_FIELD_ERRORS
    assert all(len(k) == 100 and len(v) == TEXT_LIMIT for k, v in error.errors.items())


def test_invalid_request_bounds_and_masks_hostile_field_names() -> None:
    errors = {f"{n:02} x@evil.example\n" + "f" * 500: "is not a field" for n in range(50)}
    error = e.InvalidRequestError(errors)
    assert len(error.errors) == e.MAX_FIELD_ERRORS
    for field in error.errors:
        # Bounded before the escape (the newline's escape adds 3 characters).
        assert len(field.replace("\\x0a", "\n")) == 100
        assert field.startswith(tuple(f"{n:02} ***\\x0af" for n in range(50)))
    assert "@evil" not in str(error)


@pytest.mark.timeout(10)
def test_60_kb_message_without_at_sign() -> None:
    # A proxy's HTML page: no address in it, only length.
    text = ("<div>" + "x" * 60) * 1000
    assert len(text) > 60_000
    error = e.ProviderServerError(text, status=502, body=text)
    assert len(error.message) == TEXT_LIMIT
    assert error.message == text[: TEXT_LIMIT - 3] + "..."
    assert error.body == error.message


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text",
    [
        "a@b.cd " * 150_000,
        "a" * 1_000_000 + "@example.com",
        "@" * 1_000_000,
        "a@" * 500_000,
        "a.b@c" * 200_000,
    ],
    ids=["addresses", "long-local-part", "at-signs", "a-at", "a.b@c"],
)
def test_1_mb_message_is_masked_quickly(text: str) -> None:
    assert len(text) >= 1_000_000
    error = e.ProviderError(text, body=text, errors={text: text})
    assert len(error.message) <= TEXT_LIMIT
    assert error.body == error.message
    assert [len(k) <= 100 for k in error.errors] == [True]


@pytest.mark.timeout(10)
def test_1_mb_of_addresses_is_masked() -> None:
    error = e.ProviderError("jane.doe@example.com, " * 50_000)
    assert "jane.doe" not in error.message
    assert "@" not in error.message
    assert error.message.startswith("***, ***, ")
    assert error.message.endswith("...")
