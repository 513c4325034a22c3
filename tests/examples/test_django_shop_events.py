"""The Django shop's events rules (orders/events.py) and its settings' refusal, without a
browser or Redis: events as the stream carries them, the orders in a temporary SQLite file
(the shop's own settings and migration, Django set up once in this process)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from invoice_worker.events import Event
from tests.browser import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("django") is None,
    reason="needs the examples extra (pip install -e '.[examples]')",
)

SHOP = ROOT / "examples" / "django_shop"


def event(kind: str, foreign_id: str, **fields: str) -> Event:
    parsed = Event.parse("1-0", {"kind": kind, "foreign_id": foreign_id, **fields})
    assert parsed is not None
    return parsed


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Django configured with the shop's settings on a fresh database; the `orders` app's
    modules (`events`, `models`).

    The settings are given to ``settings.configure`` without their logging: Django would
    otherwise configure the ``invoice_worker`` logger for the rest of this pytest process.
    """
    import django
    from django.conf import settings
    from django.core.management import call_command

    environ = {
        "DJANGO_SECRET_KEY": "test-key-of-the-example-shop-events-test",
        "SHOP_DATABASE": str(tmp_path_factory.mktemp("django-shop") / "shop.sqlite3"),
    }
    saved = {name: os.environ.get(name) for name in environ}
    sys.path.insert(0, str(SHOP))
    try:
        if not settings.configured:
            # The settings module reads the environment once, when it is imported.
            os.environ.update(environ)
            module = importlib.import_module("shop.settings")
            options = {name: getattr(module, name) for name in dir(module) if name.isupper()}
            settings.configure(**{**options, "LOGGING_CONFIG": None})
            django.setup()
        call_command("migrate", verbosity=0)
        from orders import events, models

        yield events, models
    finally:
        from django.db import connections

        connections.close_all()  # not left to the garbage collector (a ResourceWarning)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.path.remove(str(SHOP))


@pytest.fixture
def place(shop: Any) -> Iterator[Callable[[], Any]]:
    """Place a new order (deleted after the test)."""
    _, models = shop
    yield lambda: models.Order.objects.create(
        description="A coffee", amount="0.0005", email="buyer@example.com"
    )
    models.Order.objects.all().delete()


def states(shop: Any, *orders: Any) -> list[tuple[str, str]]:
    _, models = shop
    return [
        (got.status, got.invoice_url)
        for got in (models.Order.objects.get(pk=order.pk) for order in orders)
    ]


def test_an_order_moves_forward_only(shop: Any, place: Callable[[], Any]) -> None:
    events, _ = shop
    order = place()
    fid = order.foreign_id.upper()  # the store folds case: so does the lookup
    url = "https://pay.example/i/1"
    seen = []
    for e in [
        event("job", fid, state="created", url=url),
        event("status", fid, status="processing"),
        event("status", fid, status="confirmed"),
        # Redelivered and late events change nothing
        event("job", fid, state="created", url="https://pay.example/i/other"),
        event("status", fid, status="failed", error="Timer expired."),
        event("job", fid, state="failed", error_code="x"),
    ]:
        events.apply(e)
        seen += states(shop, order)
    assert seen == [
        ("awaiting_payment", url),
        ("awaiting_payment", url),
        ("paid", url),
        ("paid", url),
        ("paid", url),
        ("paid", url),
    ]


def test_failures_and_other_shops_events(shop: Any, place: Callable[[], Any]) -> None:
    events, _ = shop
    expired, short, untouched = place(), place(), place()
    assert len({expired.foreign_id, short.foreign_id, untouched.foreign_id}) == 3
    assert expired.foreign_id.startswith("django-shop-")
    events.apply(event("job", expired.foreign_id, state="expired", error_code="x"))
    events.apply(event("job", short.foreign_id, state="created", url="https://p.example/2"))
    events.apply(event("status", short.foreign_id, status="failed", error="Paid less."))
    # The old id scheme, other applications' invoices (one named by the bare ref), and one of
    # ours this database never had
    other = "https://x.example"
    events.apply(event("job", untouched.ref, state="created", url=other))
    events.apply(event("job", f"order-{untouched.pk}", state="created", url=other))
    events.apply(event("job", f"fastapi-shop-{untouched.ref}", state="created", url=other))
    events.apply(event("job", "django-shop-0000", state="created", url=other))
    assert states(shop, expired, short, untouched) == [
        ("failed", ""),
        ("failed", "https://p.example/2"),
        ("new", ""),
    ]


def check(**environ: str) -> subprocess.CompletedProcess[str]:
    """`manage.py check` with the environment, minus Django's and the shop's, plus `environ`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SHOP_"))}
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=SHOP, env={**env, **environ}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_no_secret_key_is_refused_unless_debugging() -> None:
    refused = check()
    assert refused.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY is not set" in refused.stderr
    assert check(DJANGO_SECRET_KEY="a-long-random-secret").returncode == 0
    assert check(SHOP_DEBUG="1").returncode == 0
