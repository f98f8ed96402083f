"""The committed migrations match the models, on every Django of the matrix: a model
change without its migration, or a Django release that would write a different one,
fails here (``makemigrations --check --dry-run``, as CI runs it too)."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db  # makemigrations reads the applied-migrations table
@pytest.mark.parametrize("app_label", ["task_workflow", "example", "testapp"])
def test_no_model_change_lacks_a_migration(app_label: str) -> None:
    out = io.StringIO()
    try:
        call_command("makemigrations", app_label, "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exc:  # makemigrations --check exits 1 when a migration is missing
        pytest.fail(f"{app_label} needs a migration (exit {exc.code}):\n{out.getvalue()}")
    assert "No changes detected" in out.getvalue()
