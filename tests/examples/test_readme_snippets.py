"""The README's web-app code blocks marked as excerpts of the example shops occur verbatim in
those files (modulo leading indentation), so that what the README shows is what the browser
tests run. `ruff format` formats the README's blocks too: a method shown dedented must format
the same at both indents (a call that fits on one line only dedented would differ)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: A marker line, then the fenced block it vouches for.
_EXCERPT = re.compile(
    r"^<!-- excerpt of (?P<path>\S+): tests/examples/test_readme_snippets\.py checks it -->\n"
    r"```python\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def excerpts() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    return [(m["path"], m["code"]) for m in _EXCERPT.finditer(readme)]


def test_the_readme_marks_its_web_app_excerpts() -> None:
    # Every marker is followed by its block (a marker the pattern missed would go unchecked),
    # and the four views are there: Django's and FastAPI's pay view and callback receiver.
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- excerpt of ") == len(excerpts())
    assert sorted(path for path, _ in excerpts()) == [
        "examples/django_shop/orders/views.py",
        "examples/django_shop/orders/views.py",
        "examples/fastapi_shop/app.py",
        "examples/fastapi_shop/app.py",
    ]


def _name(path: str, code: str) -> str:
    """``views.py:pay``: the file and the excerpt's function."""
    function = re.search(r"def (\w+)", code)
    return f"{Path(path).name}:{function[1] if function else '?'}"


@pytest.mark.parametrize(("path", "code"), [pytest.param(*e, id=_name(*e)) for e in excerpts()])
def test_an_excerpt_is_in_its_file(path: str, code: str) -> None:
    source = (ROOT / path).read_text()
    found = any(
        textwrap.indent(textwrap.dedent(code), prefix) in source for prefix in ("", "    ", "\t")
    )
    assert found, f"README's excerpt of {path} is not in it (verbatim, modulo indentation):\n{code}"
