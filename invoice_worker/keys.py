"""Where the job store keeps things: every key and channel name under ``key_prefix``, built here
once for the sync store (``store.JobStore``) and the asyncio one (``aio.AsyncJobStore``)."""

from __future__ import annotations

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.scripts import EnqueueArgs, NewJob, argv, fields_json


class Keys:
    """The job store's key names for one ``settings.key_prefix`` (no I/O)."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.key_prefix
        self.stream = settings.events_stream
        self.provider = f"{self.prefix}{c.PROVIDER_KEY}"
        self.stats = f"{self.prefix}{c.STATS_KEY}"
        self.due = f"{self.prefix}{c.DUE_KEY}"
        self.cleanups = f"{self.prefix}{c.CLEANUP_KEY}"
        self.probe = f"{self.prefix}{c.PROBE_KEY}"

    @staticmethod
    def member(foreign_id: str) -> str:
        """The id under which the store keys a job: case-folded, because the provider may
        compare ids case-insensitively (two ids differing only in case are one job here, and
        the second request is a conflict)."""
        return foreign_id.lower()

    def key(self, foreign_id: str) -> str:
        """Return the record key of ``foreign_id``."""
        return f"{self.prefix}{c.JOB_KEY}{self.member(foreign_id)}"

    def alias(self, provider_id: str) -> str:
        """Return the key naming the job of a hashed derived provider id (see ALIAS_KEY)."""
        return f"{self.prefix}{c.ALIAS_KEY}{self.member(provider_id)}"

    def copy(self, foreign_id: str) -> str:
        """Return the key of the stored task kwargs of ``foreign_id``."""
        return f"{self.prefix}{c.COPY_KEY}{self.member(foreign_id)}"

    def channel(self, foreign_id: str) -> str:
        """Return the pub/sub channel announcing the final state of ``foreign_id``."""
        return f"{self.prefix}{c.DONE_CHANNEL}{self.member(foreign_id)}"

    def enqueue_call(self, job: NewJob) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of enqueue.lua for ``job``."""
        args = EnqueueArgs(
            job.fingerprint, job.task_id, job.message, job.kwargs, self.member(job.foreign_id),
            fields_json(job.fields),
        )  # fmt: skip
        keys = [self.key(job.foreign_id), job.queue, self.stats, self.due]
        return [*keys, self.copy(job.foreign_id)], argv(args)

    def discard_call(self, foreign_id: str, task_id: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of discard.lua for the record ``task_id`` created."""
        keys = [self.key(foreign_id), self.stats, self.due, self.copy(foreign_id)]
        return keys, [task_id, self.member(foreign_id)]
