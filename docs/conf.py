"""Sphinx configuration of the task_workflow documentation.

Build: ``.venv/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html``
(``make docs``). Warnings are errors, and ``-n`` reports every reference that does not
resolve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

# autodoc imports task_workflow, whose models need a configured Django.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
import django  # noqa: E402

django.setup()

import task_workflow  # noqa: E402

project = "task_workflow"
author = "task_workflow developers"
copyright = "task_workflow developers"
release = version = task_workflow.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "task_workflow_docs",  # docs/_ext: command help, the settings table, completeness checks
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# MyST: ::: fences for directives, definition lists, anchors for headings down to ###
# so pages can link to sections (page.md#section).
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Google-style "Args:" sections (throttle) are converted by task_workflow_docs, for
# classes and functions only: sphinx.ext.napoleon would also read "text: more text" in
# an attribute's docstring as "type: description".

# Nitpicky mode (-n) reports every cross-reference that does not resolve. Without
# intersphinx (the build runs offline) the Python standard library, Django, Celery,
# django-fsm and redis-py have no inventory here, so references to their names cannot
# resolve: they are ignored by package. Names of task_workflow itself are never ignored.
nitpick_ignore_regex = [
    # The standard library (types in signatures: UUID, Any, Callable, datetime, ...).
    (r"py:.*", r"(uuid|typing|collections\.abc|datetime|types|abc|enum|argparse)\..*"),
    (r"py:.*", r"(str|int|float|bool|bytes|dict|list|tuple|set|type|object|None|Exception|BaseException)"),
    (r"py:.*", r"(ValueError|TypeError|KeyError|RuntimeError)"),
    # Django: models, signals, admin, management commands.
    (r"py:.*", r"django\..*"),
    # Celery: Task, Signature, the exceptions it uses for control flow.
    (r"py:.*", r"celery\..*"),
    # django-fsm-2 (imported as django_fsm): TransitionNotAllowed, FSMAdminMixin, FSMModelMixin.
    (r"py:.*", r"django_fsm\..*"),
    # redis-py and django-redis: clients the backends wrap.
    (r"py:.*", r"(redis|django_redis)\..*"),
]

# HTML
html_theme = "furo"
html_title = f"task_workflow {release}"
html_static_path: list[str] = []
