"""The support matrix and the release checks, as nox sessions.

``make test`` runs the default combination (Python 3.11, Django 5.2, the newest
dependencies) in ``.venv``; ``.ci/run`` runs the rest of the matrix here. Sessions:

- ``tests(pyX.Y-djangoA.B)``: the whole suite on PostgreSQL + Redis with real workers,
  for every supported Python and Django pair (Django 6 needs Python 3.12 or newer); the
  ``-lowest`` one on the lowest release of every runtime dependency that ``pyproject.toml``
  allows (their own dependencies: the newest that fit);
- ``package``: sdist and wheel, ``twine check``, the wheel's contents, and the example
  project run against the wheel installed in a fresh virtualenv;
- ``docs``: the documentation site, warnings as errors.

Each test session has its own PostgreSQL database and Redis database number, so
sessions can run side by side (``.ci/run`` runs two at a time beside ``make test``). The
interpreters are found on ``PATH`` as ``python3.11``, ``python3.12`` and ``python3.13``
(with pyenv: ``PYENV_VERSION=3.11.7:3.12.1:3.13.0``). Extra arguments go to pytest:
``nox -s "tests(py3.13-django6.1)" -- -x tests/test_models.py``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["tests", "package", "docs"]

#: (Python, Django, dependencies) the project supports: ``newest`` takes the newest release
#: of every other dependency, ``lowest`` the floor of every runtime dependency in
#: ``pyproject.toml`` (uv's lowest-direct resolution: what they need in turn, newest that
#: fits; Django's floor is 5.2.0). The first is ``make test``'s.
MATRIX = [
    ("3.11", "5.2", "newest"),
    ("3.12", "5.2", "lowest"),
    ("3.13", "5.2", "newest"),
    ("3.12", "6.0", "newest"),
    ("3.13", "6.0", "newest"),
    ("3.12", "6.1", "newest"),
    ("3.13", "6.1", "newest"),
]
DEFAULT = MATRIX[0]


def _session_id(python: str, django: str, deps: str) -> str:
    return f"py{python}-django{django}" + ("-lowest" if deps == "lowest" else "")


#: Redis database numbers for the test sessions (``make test`` uses 15; 0 is left alone).
REDIS_DBS = {_session_id(*entry): 1 + i for i, entry in enumerate(MATRIX)}


def _uv() -> str:
    """The uv that nox itself uses (installed beside it by the ``dev`` extra)."""
    from nox.virtualenv import find_uv

    has_uv, uv, _version = find_uv()
    if not has_uv:
        raise RuntimeError("the lowest session needs uv (pip install uv)")
    return uv


def _run_suite(session: nox.Session, session_id: str, redis_db: int) -> None:
    """The whole suite on PostgreSQL + Redis, on this session's own databases."""
    name = re.sub(r"\W", "_", session_id)
    env = {
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/tw_nox_{name}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
        # The quick start's project (tests/test_quickstart.py): a database of its own, after
        # the sessions' 1-7 (make test, the first pair, uses 15 and 8).
        "QUICKSTART_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db + len(MATRIX)}",
        "TASK_WORKFLOW_VAR_DIR": str(Path(session.create_tmp()) / "var"),
        # Worker logs and reports of this session: another one runs beside it (run_matrix).
        "TEST_ARTIFACTS_DIR": str(ROOT / "test-artifacts" / name),
        # Each session runs the fault campaign on a schedule of its own (make test: the
        # default seed), so the matrix adds fault schedules instead of repeating one;
        # shorter than make test's (15 s of faults, not 70: every kind still at least
        # once), which keeps the matrix within CI's time.
        "TWF_SEED": os.environ.get("TWF_SEED", str(20261201 + redis_db)),
        "TWF_DURATION": os.environ.get("TWF_DURATION", "15"),
    }
    session.run(
        "python",
        "-c",
        "import django, celery, redis, django_redis; print(django.get_version(), "
        "celery.__version__, redis.__version__, django_redis.__version__)",
    )
    # Failovers on a Redis topology (the failover campaign, Sentinel failovers) test Redis,
    # not Python or Django versions: `make test` runs them once; the Sentinel tests of the
    # factory and the checks run in every session.
    marks = "not campaign and not failover_campaign"
    session.run("pytest", "-p", "no:cacheprovider", "-m", marks, *session.posargs, env=env)


@nox.session
@nox.parametrize(
    ("python", "django", "deps"),
    [
        nox.param(*entry, id=_session_id(*entry), tags=[] if entry == DEFAULT else ["matrix"])
        for entry in MATRIX
    ],
)
def tests(session: nox.Session, django: str, deps: str) -> None:
    """The whole suite on one Python and Django pair (newest or lowest dependencies)."""
    if deps == "lowest":
        floors = Path(session.create_tmp()) / "lowest.txt"
        session.run(
            _uv(), "pip", "compile", "--quiet", "--resolution", "lowest-direct",
            "--python-version", str(session.python), "--extra", "postgres",
            "--output-file", str(floors), str(ROOT / "pyproject.toml"),
            external=True,
        )  # fmt: skip
        session.install("-e", ".[test]", "--constraint", str(floors))
    else:
        session.install("-e", ".[test]", f"Django~={django}.0")
    session_id = _session_id(str(session.python), django, deps)
    _run_suite(session, session_id, REDIS_DBS[session_id])


@nox.session(python=DEFAULT[0])
def package(session: nox.Session) -> None:
    """Build, check and install the distributions; run the example against the wheel."""
    session.install("build", "twine")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT))
    session.run("twine", "check", "--strict", *map(str, dist.iterdir()))
    session.run("python", str(ROOT / ".ci" / "check_package.py"), str(dist))


@nox.session(python=DEFAULT[0])
def docs(session: nox.Session) -> None:
    """The documentation site, warnings as errors."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-n", "-b", "html", "docs", "docs/_build/html")
