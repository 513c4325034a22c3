"""The benchmark: ``make bench`` (quick) or ``python -m bench.run --full``; see docs/benchmarks.md.

Modules: ``run`` (command line and plans), ``scenarios`` (one measured run each), ``stack``
(Redis, the sandbox and worker processes), ``load`` and ``ceiling`` (child processes that
enqueue or run jobs), ``bare_app`` (the bare-Celery reference), ``measure`` (/proc readings and
statistics), ``report`` (table, JSON, plot), ``enqueue_aio`` (sync vs asyncio enqueue rate).
"""
