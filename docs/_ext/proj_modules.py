"""Directives that document proj's modules and exports from the code, so
what is added to the code is on the site (and its docstrings must render)
without anyone listing it.

``.. proj-modules::``: a section per module of a package, each
``automodule`` with its members.

::

    .. proj-modules:: proj.jobs
       :exclude: proj.jobs.testing, proj.jobs.api

Modules are taken in name order, the package first; ``:exclude:`` leaves
out modules documented elsewhere (``name`` that module, ``name.*`` it and
everything under it), ``:no-package:``
the package itself. Alembic's ``env`` scripts and revision
files are never imported: running them is what migrates a database.

``.. proj-exports:: package``: each name of the package's ``__all__`` not
documented yet (``:kind: exception`` for the exceptions only), so a name
added to ``__all__`` lands on the API page by itself.

Objects a package re-exports in its ``__all__`` (``proj.jobs.Jobs``,
``proj.jobs.testing.worker``...) are documented under that public name on
the API pages; here they are left out of their defining module, and
references to the defining module's name resolve to the public entry
(autodoc marks it as the canonical name).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

NEVER_IMPORTED = (".migrations.env", ".versions.")
"""Alembic's scripts: importing them would run a migration."""
PUBLIC_PACKAGES = ("proj.jobs", "proj.jobs.testing")
"""Packages whose ``__all__`` names are documented under the package's name."""


def modules_of(package: str) -> Iterator[str]:
    """The package and every module under it, in name order."""
    root = importlib.import_module(package)
    names = [package]
    if hasattr(root, "__path__"):
        names += [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")]
    for name in sorted(names):
        if not any(part in f"{name}." for part in NEVER_IMPORTED):
            yield name


def public_objects() -> set[int]:
    """The ids of the objects the public packages re-export."""
    found: set[int] = set()
    for package in PUBLIC_PACKAGES:
        try:
            module = importlib.import_module(package)
        except Exception:  # noqa: S112 (import_everything has reported it)
            continue
        found.update(id(getattr(module, name)) for name in getattr(module, "__all__", ()))
    return found


def skipped(name: str, pattern: str) -> bool:
    """Whether ``pattern`` (a module, or ``package.*``) covers module ``name``."""
    if pattern.endswith(".*"):
        package = pattern.removesuffix(".*")
        return name == package or name.startswith(f"{package}.")
    return name == pattern


class ModuleSections(SphinxDirective):
    """The directive: one argument (the package), ``:exclude:``."""

    required_arguments = 1
    option_spec = {"exclude": directives.unchanged, "no-package": directives.flag}

    def run(self) -> list[nodes.Node]:
        excluded = [name.strip() for name in self.options.get("exclude", "").split(",")]
        excluded = [name for name in excluded if name]
        lines: list[str] = []
        for name in modules_of(self.arguments[0]):
            if any(skipped(name, pattern) for pattern in excluded):
                continue
            if name == self.arguments[0] and "no-package" in self.options:
                continue
            title = f"``{name}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {name}", "   :members:", ""]
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=True)


KINDS = {
    "exception": "autoexception",
    "class": "autoclass",
    "function": "autofunction",
    "data": "autodata",
}


def kind_of(obj: Any) -> str:
    """Which autodoc directive documents ``obj``."""
    if isinstance(obj, type):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function" if callable(obj) and hasattr(obj, "__code__") else "data"


def source_line(obj: Any) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 0


class PublicNames(SphinxDirective):
    """``.. proj-exports:: package``: every name of the package's ``__all__``
    not documented yet on the site, in source order (a ``:kind:`` of them
    only, if given), under a ``:title:`` when there is any."""

    required_arguments = 1
    option_spec = {
        "kind": lambda value: directives.choice(value, tuple(KINDS)),
        "title": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        module = importlib.import_module(package)
        documented = self.env.domains.python_domain.objects
        wanted = self.options.get("kind")
        found = []
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if f"{package}.{name}" in documented or (wanted and kind_of(obj) != wanted):
                continue
            found.append((getattr(obj, "__module__", "") or "", source_line(obj), name, obj))
        lines: list[str] = []
        title = self.options.get("title")
        if found and title:
            lines += [title, "-" * len(title), ""]
        for _, _, name, obj in sorted(found, key=lambda item: item[:3]):
            lines += [f".. {KINDS[kind_of(obj)]}:: {package}.{name}"]
            if kind_of(obj) in ("class", "exception"):
                lines += ["   :members:"]
            if kind_of(obj) == "data":
                lines += ["   :no-value:"]
            lines += [""]
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=True)


def import_everything(app: Sphinx) -> None:
    """Import every module of proj before autodoc reads any.

    Sphinx 9's autodoc writes the annotations it finds in the source onto
    every class in a documented class's MRO, SQLAlchemy's typing-only
    ``_DeclarativeTyping`` included (sphinx-doc/sphinx#14618): a declarative
    model class made after that fails on ``__table_args__``. Made first, they
    are all fine.
    """
    for name in modules_of("proj"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported, and autodoc reports it again
            logger.warning("cannot import %s: %r", name, exc)


_public: set[int] = set()


def skip_public(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Leave a re-exported object out of its defining module's section."""
    if what == "module" and id(obj) in _public:
        return True
    return None


def prepare(app: Sphinx) -> None:
    import_everything(app)
    _public.clear()
    _public.update(public_objects())


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("proj-modules", ModuleSections)
    app.add_directive("proj-exports", PublicNames)
    app.connect("builder-inited", prepare)
    app.connect("autodoc-skip-member", skip_public)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
