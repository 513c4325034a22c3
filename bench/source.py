"""Which invoice_worker code a run measures: the working tree, or a clean copy of a commit."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> bytes:
    """Run git in this checkout and return its output.

    Raises:
        subprocess.CalledProcessError: git failed.
    """
    exe = shutil.which("git") or "git"
    return subprocess.run([exe, "-C", str(ROOT), *args], capture_output=True, check=True).stdout  # noqa: S603 - fixed argv


def source() -> dict[str, Any]:
    """The commit measured, and whether the package files differed from it."""
    import invoice_worker

    if commit := os.environ.get("BENCH_COMMIT"):
        return {"source": "git archive", "commit": commit, "dirty": False}
    path = Path(invoice_worker.__file__).parent
    try:
        commit = git("rev-parse", "HEAD").decode().strip()
        dirty = bool(git("status", "--porcelain", "--", str(path)).strip())
    except (OSError, subprocess.CalledProcessError):
        return {"source": str(path), "commit": None, "dirty": None}
    return {"source": str(path), "commit": commit, "dirty": dirty}


def from_commit(ref: str, argv: list[str], args: argparse.Namespace) -> int:
    """Run the benchmark against ``invoice_worker`` as committed at ``ref``: a clean copy,
    first on PYTHONPATH (ahead of the editable install), whatever the working tree holds."""
    src = Path(tempfile.mkdtemp(prefix="invoice-bench-src-"))
    try:
        sha = git("rev-parse", ref).decode().strip()
        with tarfile.open(fileobj=io.BytesIO(git("archive", sha, "invoice_worker"))) as tar:
            tar.extractall(src, filter="data")
        ignore = shutil.ignore_patterns("results", "__pycache__")
        shutil.copytree(ROOT / "bench", src / "bench", ignore=ignore)
        env = os.environ | {"PYTHONPATH": str(src), "BENCH_COMMIT": sha}
        rest = _without(argv, ("--commit", "--out", "--plot"))
        rest += ["--out", str(args.out), "--plot", str(args.plot.resolve())]
        argv = [sys.executable, "-m", "bench.run", *rest]
        return subprocess.run(argv, cwd=src, env=env, check=False).returncode  # noqa: S603
    finally:
        shutil.rmtree(src, ignore_errors=True)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less ``options`` and their values (``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out
