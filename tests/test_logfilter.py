"""The filter on Celery's and kombu's loggers, fed the records those libraries emit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import MappingProxyType

import pytest
from celery.app.trace import LOG_FAILURE, LOG_RECEIVED
from celery.worker.consumer.consumer import (
    INVALID_TASK_ERROR,
    MESSAGE_DECODE_ERROR,
    UNKNOWN_FORMAT,
    UNKNOWN_TASK_ERROR,
)

from invoice_worker import logfilter
from invoice_worker.logfilter import HIDDEN, LOGGERS, CeleryLogFilter
from invoice_worker.privacy import escape_controls as escape

BUYER = "buyer@example.com"
FORGED = "[2030-01-01 00:00:00,000: INFO/MainProcess] forged"
FORMAT = logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")


@pytest.fixture
def filtered(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logfilter.install()
    caplog.set_level(logging.DEBUG)
    yield caplog
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, CeleryLogFilter)]:
            logger.removeFilter(f)


def text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(FORMAT.format(r) for r in caplog.records)


def assert_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        lines = FORMAT.format(record).splitlines()
        assert not [line for line in lines if line.startswith("[2030-")], lines


def test_install_is_idempotent(filtered: pytest.LogCaptureFixture) -> None:
    logfilter.install()
    for name in LOGGERS:
        assert sum(isinstance(f, CeleryLogFilter) for f in logging.getLogger(name).filters) == 1


def test_escape() -> None:
    assert (
        escape("a\nb\r\x00\x1b[31m\x7f\x85\u2028é")
        == "a\\x0ab\\x0d\\x00\\x1b[31m\\x7f\\x85\\u2028é"
    )


CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]


@pytest.mark.parametrize("template", ["%s", "%r"])
def test_every_control_character_in_an_argument_is_escaped(
    filtered: pytest.LogCaptureFixture, template: str
) -> None:
    # Printable text is left unwrapped (str.isprintable): none of these may pass as printable,
    # in a tuple argument or in a context dict, formatted with %s or with %r.
    log = logging.getLogger("celery.app.trace")
    for code in CONTROLS:
        value = f"t-{chr(code)}x"
        log.info(f"Task {template} done", value)
        log.info(f"Task %(id){template[1]} done", {"id": value})
    for record in filtered.records:
        message = record.getMessage()
        assert message.startswith(("Task t-\\", "Task 't-\\")), message  # escaped, not withheld
        assert not any(chr(code) in message for code in CONTROLS), repr(message)
    assert len(filtered.records) == 2 * len(CONTROLS)


def test_a_mapping_argument_that_is_not_a_dict_is_escaped(
    filtered: pytest.LogCaptureFixture,
) -> None:
    # logging takes a lone Mapping argument as the format's mapping, whatever its type
    context = MappingProxyType({"id": f"t-1\n{FORGED}", "kwargs": BUYER})
    logging.getLogger("celery.app.trace").info("Task %(id)s done %(kwargs)s", context)
    assert filtered.records[0].getMessage() == f"Task t-1\\x0a{FORGED} done {HIDDEN}"
    assert_one_line_each(filtered)


def test_printable_text_is_formatted_as_is(filtered: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("celery.app.trace")
    args = ("invoices.create", "t-1 é ✓", "created https://x/é")
    log.info("Task %s[%s] succeeded: %r", *args)
    [record] = filtered.records
    assert record.getMessage() == "Task invoices.create[t-1 é ✓] succeeded: 'created https://x/é'"
    assert isinstance(record.args, tuple)
    assert all(a is b for a, b in zip(record.args, args, strict=True))  # left unwrapped


def test_celery_body_dumps_dropped(filtered: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("celery.worker.consumer.consumer")
    body = f'b\'[[], {{"email_user": "{BUYER}"}}, {{}}]\' (40b)'
    log.error(UNKNOWN_TASK_ERROR, KeyError("shop.unknown"), body, {"id": "1"}, {}, exc_info=False)
    log.error(INVALID_TASK_ERROR, ValueError("x"), body)
    log.critical(MESSAGE_DECODE_ERROR, ValueError("x"), "application/json", "utf-8", "{}", body)
    log.warning(UNKNOWN_FORMAT, f"body: {body}")
    log.info("Started consuming from %s", "invoices")
    assert [r.getMessage() for r in filtered.records] == ["Started consuming from invoices"]


def test_received_line_escaped_and_kwargs_hidden(filtered: pytest.LogCaptureFixture) -> None:
    # As celery.worker.strategy logs it: the context is the argument and the "data" extra.
    context = {
        "id": f"t-1\n{FORGED}",
        "name": "invoices.create",
        "args": "()",
        "kwargs": f"{{'request': {{'email_user': '{BUYER}'}}}}",
        "eta": None,
    }
    logging.getLogger("celery.worker.strategy").info(LOG_RECEIVED, context, extra={"data": context})
    [record] = filtered.records
    assert record.getMessage() == f"Task invoices.create[t-1\\x0a{FORGED}] received"
    assert record.args["kwargs"] == HIDDEN  # type: ignore[call-overload,index]
    assert record.data["kwargs"] == HIDDEN  # type: ignore[attr-defined]
    assert BUYER not in repr(record.__dict__)
    assert_one_line_each(filtered)


def test_exception_text_escaped_in_traceback(filtered: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("celery.worker.request")
    try:
        try:
            raise KeyError(f"k\n{FORGED}")
        except KeyError as exc:
            raise ValueError(f"refused type text/x\n{FORGED}") from exc
    except ValueError as exc:
        log.error("Task handler raised error: %r", exc, exc_info=True)
    out = text(filtered)
    assert "Traceback (most recent call last):" in out
    assert f"ValueError: refused type text/x\\x0a{FORGED}" in out
    assert "The above exception was the direct cause" in out
    assert_one_line_each(filtered)


def test_failure_line_keeps_formatting_and_hides_kwargs(
    filtered: pytest.LogCaptureFixture,
) -> None:
    context = {
        "hostname": "w@h", "id": "t-9", "name": "invoices.create", "exc": "ValueError('x')",
        "traceback": "", "args": "()", "kwargs": BUYER, "description": "raised unexpected",
        "internal": False,
    }  # fmt: skip
    logging.getLogger("celery.app.trace").error(LOG_FAILURE, context, extra={"data": context})
    assert text(filtered).endswith("Task invoices.create[t-9] raised unexpected: ValueError('x')")
    assert BUYER not in repr(filtered.records[0].__dict__)


def test_numbers_still_format(filtered: pytest.LogCaptureFixture) -> None:
    logging.getLogger("celery.worker.request").warning("limit %d for %s: %.1f", 3, "a\nb", 1.25)
    assert filtered.records[0].getMessage() == "limit 3 for a\\x0ab: 1.2"


def test_eta_error_names_the_task_only(filtered: pytest.LogCaptureFixture) -> None:
    info = {"id": "t-2", "name": "invoices.create", "args": "()", "kwargs": BUYER}
    logging.getLogger("celery.worker.strategy").error(
        logfilter.ETA_ERROR, "9999-99\n", OverflowError("big"), info
    )
    assert filtered.records[0].getMessage() == (
        "Couldn't convert ETA 9999-99\\x0a to timestamp: OverflowError('big'). "
        "Task: invoices.create[t-2]"
    )


def test_kombu_restore_error_names_the_message_only(filtered: pytest.LogCaptureFixture) -> None:
    payload = {"headers": {"task": "invoices.create", "id": "t-3"}, "body": BUYER}
    logging.getLogger("kombu.transport.redis").critical(logfilter.RESTORE_ERROR, payload)
    assert filtered.records[0].getMessage() == (
        "Could not restore message invoices.create[t-3] (payload not logged)"
    )


def test_templates_are_celery_and_kombus_own() -> None:
    # The two rewritten lines are literals in the installed sources; a new wording needs a look.
    import inspect

    from celery.worker import strategy
    from kombu.transport import redis as kombu_redis

    assert f'error("{logfilter.ETA_ERROR[:30]}' in inspect.getsource(strategy)
    assert f"crit('{logfilter.RESTORE_ERROR}'" in inspect.getsource(kombu_redis)


def test_a_failing_rewrite_withholds_the_line(
    filtered: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(args: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(logfilter, "_escaped", broken)
    logging.getLogger("celery.worker.request").error("Task %s failed", BUYER)
    assert filtered.records[0].getMessage() == (
        "(a log line was withheld: it could not be made safe)"
    )
