"""Sphinx helpers of the task_workflow documentation.

Directives:

``django-command-help``
    The ``--help`` text of a management command, as Django's argument parser prints it.
``task-workflow-settings``
    A table of every ``TASK_WORKFLOW`` key: its default (``task_workflow.conf.DEFAULTS``),
    the values the system checks accept (``task_workflow.checks.VALIDATORS``) and the
    comment above the key in ``task_workflow/conf.py``.

Google-style ``Args:`` sections of class and function docstrings become field lists.

A type variable of a signature (``ModelT`` of ``apply_transition``) is shown by its name,
not linked: it is internal, so no page documents it, and nitpicky mode would report it.

Completeness checks, reported as warnings (so ``-W`` fails the build):

- every name in ``task_workflow.tasks.__all__`` is documented;
- every system check id in ``task_workflow/checks.py`` has a row on ``reference/checks``;
- every management command of ``task_workflow`` has a ``django-command-help`` on
  ``reference/commands``.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

PACKAGE = Path(importlib.import_module("task_workflow").__file__).parent  # type: ignore[arg-type]
CHECK_ID = re.compile(r"task_workflow\.[EW]\d{3}")


class DjangoCommandHelp(SphinxDirective):
    """``--help`` of ``manage.py <command>`` as a literal block."""

    required_arguments = 1
    option_spec = {"app": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        from django.core.management import load_command_class

        name = self.arguments[0]
        app = self.options.get("app", "task_workflow")
        command = load_command_class(app, name)
        columns = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "92"  # argparse wraps to $COLUMNS
        try:
            text = command.create_parser("manage.py", name).format_help()
        finally:
            if columns is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = columns
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _setting_comments() -> dict[str, str]:
    """The comment lines right above each key of ``DEFAULTS`` in ``conf.py``; a key with
    none shares the comment of the key above it (``THROTTLE_RETRY_BACKOFF_MAX``)."""
    source = (PACKAGE / "conf.py").read_text(encoding="utf-8")
    body = source.split("DEFAULTS", 1)[1]
    comments: dict[str, str] = {}
    pending: list[str] = []
    previous = ""
    for line in body.splitlines():
        stripped = line.strip()
        if stripped == "}":
            break
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r'"([A-Z_]+)"\s*:', stripped)
        if match:
            previous = " ".join(pending) if pending else previous
            comments[match.group(1)] = previous
            pending = []
    return comments


class TaskWorkflowSettings(SphinxDirective):
    """Table of every ``TASK_WORKFLOW`` key, from ``task_workflow.conf``."""

    def run(self) -> list[nodes.Node]:
        from task_workflow.checks import VALIDATORS
        from task_workflow.conf import DEFAULTS

        self.env.note_dependency(str(PACKAGE / "conf.py"))
        self.env.note_dependency(str(PACKAGE / "checks.py"))
        comments = _setting_comments()
        headers = ("key", "default", "accepted values", "meaning")
        table = nodes.table(classes=["task-workflow-settings"])
        group = nodes.tgroup(cols=len(headers))
        table += group
        for width in (22, 12, 26, 40):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row([nodes.paragraph(text=header) for header in headers])
        body = nodes.tbody()
        group += body
        for key, default in DEFAULTS.items():
            target = nodes.target("", "", ids=[f"setting-{key.lower().replace('_', '-')}"])
            name = nodes.paragraph()
            name += target
            name += nodes.literal(text=key)
            accepted = VALIDATORS[key][1] if key in VALIDATORS else ""
            body += self._row(
                [
                    name,
                    nodes.paragraph("", "", nodes.literal(text=repr(default))),
                    self._text(accepted),
                    self._text(comments.get(key, "")),
                ]
            )
        return [table]

    @staticmethod
    def _row(cells: list[nodes.Node]) -> nodes.row:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            row += entry
        return row

    def _text(self, text: str) -> nodes.paragraph:
        """``text`` with its ````code```` spans (the form conf.py's comments use)."""
        paragraph = nodes.paragraph()
        for index, part in enumerate(re.split(r"``(.+?)``", text)):
            if index % 2:
                paragraph += nodes.literal(text=part)
            elif part:
                paragraph += nodes.Text(part)
        return paragraph


def _documented_python_objects(env: BuildEnvironment) -> set[str]:
    domain: Any = env.get_domain("py")
    return {name for name, *_ in domain.get_objects()}


def _page_source(app: Sphinx, docname: str) -> str:
    for suffix in app.config.source_suffix:
        path = Path(app.srcdir) / f"{docname}{suffix}"
        if path.exists():
            return path.read_text(encoding="utf-8")
    return ""


def check_completeness(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn about public names, check ids and commands the pages do not document."""
    from django.core.management import find_commands

    tasks = importlib.import_module("task_workflow.tasks")
    documented = _documented_python_objects(env)
    for name in tasks.__all__:
        obj = getattr(tasks, name)
        candidates = {f"task_workflow.tasks.{name}"}
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if module and qualname:
            candidates.add(f"{module}.{qualname}")
        if not candidates & documented:
            logger.warning("task_workflow.tasks.%s (in __all__) is not documented in the reference", name)

    checks_page = _page_source(app, "reference/checks")
    check_source = (PACKAGE / "checks.py").read_text(encoding="utf-8")
    for check_id in sorted(set(CHECK_ID.findall(check_source))):
        if f"| `{check_id}` |" not in checks_page:  # a row of the table
            logger.warning("system check %s is not documented on reference/checks", check_id)

    commands_page = _page_source(app, "reference/commands")
    for name in find_commands(str(PACKAGE / "management")):
        if not re.search(rf"django-command-help\}}?\s+{re.escape(name)}\b", commands_page):
            logger.warning("management command %s is not documented on reference/commands", name)


NAPOLEON = NapoleonConfig(napoleon_use_param=True, napoleon_use_rtype=True)


def google_sections(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Google-style sections ("Args:") of class and function docstrings as field lists."""
    if what in ("class", "exception", "function", "method", "decorator"):
        lines[:] = GoogleDocstring(lines, NAPOLEON, what=what, name=name, obj=obj).lines()


def unlinked_type_variables(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve a reference to a ``TypeVar`` of ``task_workflow`` as its plain name."""
    target = node.get("reftarget", "")
    module_name, _, attribute = target.rpartition(".")
    if node.get("refdomain") != "py" or not module_name.startswith("task_workflow"):
        return None
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None
    return contnode if isinstance(value, TypeVar) else None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", google_sections)
    app.add_directive("django-command-help", DjangoCommandHelp)
    app.add_directive("task-workflow-settings", TaskWorkflowSettings)
    app.connect("env-check-consistency", check_completeness)
    app.connect("missing-reference", unlinked_type_variables)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
