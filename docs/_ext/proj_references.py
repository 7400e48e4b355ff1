"""Python cross-references resolved as the module that writes them sees its
names.

A docstring in ``proj/jobs/tracing.py`` writes :class:`ConfigurationError`
because the module imports it; a signature in ``proj/jobs/outbox.py`` says
``orm.Session`` because the module imports ``orm`` from SQLAlchemy. Sphinx
looks a short name up in the documented module only; this extension, on a
reference Sphinx could not resolve, follows the module's own imports (those
under ``if TYPE_CHECKING:`` too):

- to a proj object: the reference links to where it is documented, under
  its public name when :mod:`proj.jobs` or :mod:`proj.jobs.testing`
  re-exports it;
- to another project's object: it is shown unlinked (the build runs offline,
  without intersphinx), and is not a warning;
- to nothing, or to a proj object documented nowhere: Sphinx's warning
  stands (the build treats warnings as errors).

A name the module does not bind is looked up in proj's other modules, when
it means one thing there (or only other projects' things): the resolver
never guesses between two proj objects.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from typing import Any, TypeVar

from docutils import nodes
from proj_modules import PUBLIC_PACKAGES, modules_of
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.nodes import make_refnode

MISSING = object()


@functools.cache
def bindings(module_name: str) -> dict[str, str]:
    """What each top-level name of a module refers to, as a dotted path: its
    imports (anywhere in the module) and its own definitions."""
    try:
        module = importlib.import_module(module_name)
        tree = ast.parse(inspect.getsource(module))
    except (ImportError, OSError, TypeError, SyntaxError):
        return {}
    package = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{source}" if source else base
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    first = alias.name.partition(".")[0]
                    bound[first] = first
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound[node.name] = f"{module_name}.{node.name}"
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    bound[target.id] = f"{module_name}.{target.id}"
    return bound


@functools.cache
def everywhere() -> dict[str, set[str]]:
    """What each name refers to in any of proj's modules."""
    found: dict[str, set[str]] = {}
    for module_name in modules_of("proj"):
        for name, path in bindings(module_name).items():
            found.setdefault(name, set()).add(path)
    return found


def lookup(path: str) -> Any:
    """The object at a dotted path, importing what it needs; MISSING if none."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        except Exception:
            return MISSING
        for part in parts[cut:]:
            obj = getattr(obj, part, MISSING)
            if obj is MISSING:
                return MISSING
        return obj
    return MISSING


@functools.cache
def public_names() -> dict[int, str]:
    """The public name of each object the public packages re-export, by id."""
    names: dict[int, str] = {}
    for package in PUBLIC_PACKAGES:
        try:
            module = importlib.import_module(package)
        except Exception:  # noqa: S112 (reported when the build began)
            continue
        for name in getattr(module, "__all__", ()):
            names[id(getattr(module, name))] = f"{package}.{name}"
    return names


def documented_as(path: str, objects: dict[str, Any]) -> str | None:
    """The documented name of the object at ``path``: itself, or its public
    name followed by the rest of the path."""
    if path in objects:
        return path
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        obj = lookup(".".join(parts[:cut]))
        public = public_names().get(id(obj)) if obj is not MISSING else None
        if public:
            name = ".".join([public, *parts[cut:]])
            return name if name in objects else None
    return None


def candidates(target: str, module_name: str | None, class_name: str | None) -> list[str]:
    """The dotted paths a reference may mean, most specific first."""
    first, dot, rest = target.partition(".")
    paths: list[str] = []
    if module_name:
        if class_name:
            paths.append(f"{module_name}.{class_name}.{target}")
        bound = bindings(module_name).get(first)
        if bound:
            paths.append(bound + dot + rest)
    paths.append(target)
    # What the name means in proj's other modules, when that is one thing (or
    # only other projects' things): never a guess between two proj objects.
    elsewhere = everywhere().get(first, set())
    if len({path for path in elsewhere if path.startswith("proj")}) <= 1:
        paths += [path + dot + rest for path in sorted(elsewhere)]
    return list(dict.fromkeys(paths))


def resolve(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.Node | None:
    """The ``missing-reference`` handler for the Python domain."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    objects = env.domains.python_domain.objects
    paths = candidates(target, node.get("py:module"), node.get("py:class"))
    for path in paths:
        name = documented_as(path, objects)
        if name:
            entry = objects[name]
            return make_refnode(
                app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
            )
    for path in paths:
        obj = lookup(path)
        if obj is MISSING:
            continue
        if isinstance(obj, TypeVar) or not path.startswith("proj"):
            return contnode  # a type variable, or another project's object
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", resolve)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
