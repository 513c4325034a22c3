"""Settings of the example shop: read from the environment once, here.

The invoice side reads its own ``INVOICE_*`` variables (Redis, the provider's URL, key and
secret), as every invoice-worker process does; the shop adds ``SHOP_*``:

    SHOP_PUBLIC_URL      the shop's public https origin: where the provider's page sends the
                         payer back (it takes only https URLs on a domain name)
    SHOP_DATABASE        the sqlite file (default db.sqlite3 beside manage.py)
    SHOP_INVOICE_WAIT    seconds the pay view waits for the invoice before showing the
                         waiting page (default 3)
    SHOP_DEBUG           1 for Django's debug pages (default 0)
    DJANGO_SECRET_KEY    Django's signing key: required unless SHOP_DEBUG=1 (then a fixed
                         development key when unset)
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

SHOP_PUBLIC_URL = os.environ.get("SHOP_PUBLIC_URL", "https://shop.example.com").rstrip("/")
SHOP_INVOICE_WAIT = float(os.environ.get("SHOP_INVOICE_WAIT", "3"))
#: No invoice is created for a click older than this (the payer has left by then).
SHOP_INVOICE_DEADLINE = 120.0

DEBUG = os.environ.get("SHOP_DEBUG") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        # A key everyone can read signs nothing: refuse rather than run a shop on it.
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set: set it to a long random secret "
            "(or SHOP_DEBUG=1 for development, with a fixed development key)"
        )
    SECRET_KEY = "example-shop-development-key-not-secret"  # noqa: S105 (SHOP_DEBUG=1 only)
ALLOWED_HOSTS = ["127.0.0.1", "localhost", urlsplit(SHOP_PUBLIC_URL).hostname or ""]
# The pay form is posted on the public origin, which a TLS-terminating proxy serves.
CSRF_TRUSTED_ORIGINS = [SHOP_PUBLIC_URL]

INSTALLED_APPS = ["orders"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "shop.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
WSGI_APPLICATION = "shop.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DATABASE", str(BASE_DIR / "db.sqlite3")),
        # The web server and the events consumer write the same file.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "orders": {"handlers": ["console"], "level": "INFO"},
        "invoice_worker": {"handlers": ["console"], "level": "INFO"},
    },
}
