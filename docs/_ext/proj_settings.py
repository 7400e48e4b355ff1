"""``.. proj-settings::``: the table of a settings object's environment
variables, generated from the code rather than copied.

::

    .. proj-settings:: proj.jobs.settings.JobsSettings
       :defaults: proj.jobs.settings.DEFAULTS

One row per variable of the ``:defaults:`` mapping, in its order: the
variable, its default, and the docstring of the attribute it sets on the
class (``PROJ_WORKER_POOL_SIZE`` sets ``worker_pool_size``: the prefix
``PROJ_`` or ``CELERY_`` dropped, lower case). The mapping's own docstring
opens the table. Each variable becomes a target of ``:envvar:`` (the first
table that names it). A variable whose attribute is missing, or has no
docstring, is a warning, so a setting cannot land undocumented.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

PREFIXES = ("PROJ_", "CELERY_")


def attribute_for(variable: str) -> str:
    """The settings attribute an environment variable sets."""
    for prefix in PREFIXES:
        if variable.startswith(prefix):
            return variable.removeprefix(prefix).lower()
    return variable.lower()


def resolve(dotted: str) -> tuple[Any, str, str]:
    """The object at ``module.name``, its module's name and its own name."""
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name), module_name, name


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings of ``cls``'s attributes: those written under an
    assignment, and those of its properties."""
    analyzer = ModuleAnalyzer.for_module(cls.__module__)
    found = {
        attr: "\n".join(lines).strip()
        for (owner, attr), lines in analyzer.find_attr_docs().items()
        if owner == cls.__qualname__
    }
    for attr, value in vars(cls).items():
        if isinstance(value, property) and value.__doc__:
            found.setdefault(attr, inspect.cleandoc(value.__doc__))
    return found


class SettingsTable(SphinxDirective):
    """The directive: one argument (the settings class), ``:defaults:``."""

    required_arguments = 1
    option_spec = {"defaults": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        cls, _, class_name = resolve(self.arguments[0])
        defaults, module_name, mapping_name = resolve(self.options["defaults"])
        if not isinstance(defaults, Mapping):
            raise self.error(f"{self.options['defaults']} is not a mapping")
        docs = attribute_docs(cls)
        mapping_doc = (
            ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", mapping_name), [])
        )
        intro = self.parse_text_to_nodes("\n".join(mapping_doc))

        table = nodes.table(classes=["proj-settings"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (30, 20, 50):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += self.row(
            [[nodes.Text("variable")], [nodes.Text("default")], [nodes.Text("meaning")]]
        )
        group += head
        body = nodes.tbody()
        group += body
        for variable, default in defaults.items():
            attr = attribute_for(variable)
            doc = docs.get(attr)
            if doc is None:
                logger.warning(
                    "%s sets %s.%s, which has no docstring (or does not exist): "
                    "write one under the attribute",
                    variable,
                    class_name,
                    attr,
                    location=self.get_location(),
                )
                doc = ""
            body += self.row(
                [
                    [self.variable_cell(variable)],
                    [nodes.literal(text=default) if default else nodes.Text("none")],
                    self.parse_text_to_nodes(doc),
                ]
            )
        return [*intro, table]

    def variable_cell(self, variable: str) -> nodes.Node:
        """The variable's name, and the first time a target for ``:envvar:``."""
        literal = nodes.literal(text=variable)
        std = self.env.domains.standard_domain
        if ("envvar", variable) in std.objects:
            return literal
        node_id = nodes.make_id(f"envvar-{variable}")
        target = nodes.inline(ids=[node_id])
        target += literal
        self.state.document.note_explicit_target(target)
        std.note_object("envvar", variable, node_id, location=self.get_location())
        return target

    @staticmethod
    def row(cells: list[list[nodes.Node]]) -> nodes.row:
        """A table row; inline content is put in a paragraph of its own."""
        row = nodes.row()
        for content in cells:
            entry = nodes.entry()
            if all(isinstance(node, nodes.Body) for node in content):
                entry.extend(content)
            else:
                paragraph = nodes.paragraph()
                paragraph.extend(content)
                entry += paragraph
            row += entry
        return row


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("proj-settings", SettingsTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
