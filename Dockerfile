# Slim, non-root image for the worker, Flower and the sandbox (one image, three commands).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY invoice_worker ./invoice_worker
RUN pip install '.[flower]' && useradd --create-home --uid 10001 app
USER app

# Our own health only (settings and Redis): a provider outage must not restart healthy workers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["invoice-worker", "check", "--no-provider"]

# SIGTERM = Celery warm shutdown: running jobs finish; give it the soft time limit (~80 s).
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "invoice_worker.worker", "worker", "-Q", "invoices", "-P", "threads", "-c", "32", "-l", "INFO", "--without-gossip", "--without-mingle"]
