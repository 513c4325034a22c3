"""The local stack: everything ``invoice-worker dev`` and the tests run on one machine.

Development tooling: no product module imports this package. ``embedded`` is a private Redis
(``redis-server``, else fakeredis from the ``devstack`` extra), ``processes`` the Celery worker
and Flower child processes, ``dev`` the ``invoice-worker dev`` command and ``demo`` its demo.
"""
