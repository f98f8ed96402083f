"""Check the built distributions and run the example project against the installed wheel.

Usage: ``python .ci/check_package.py DIST_DIR`` (``nox -s package`` builds ``DIST_DIR``).

1. The wheel holds every file of the ``task_workflow`` package that git tracks (modules,
   migrations, templates, static files, ``py.typed``) and nothing from ``tests/`` or
   ``example_project/``; the sdist holds ``LICENSE``, ``CHANGELOG.md`` and ``README.md``.
2. A fresh virtualenv gets the wheel (not an editable install), and a copy of
   ``example_project/`` and ``manage.py`` in a directory of their own (so the checkout's
   ``task_workflow/`` cannot shadow the installed one) runs: ``check``,
   ``makemigrations --check --dry-run``, ``migrate``, ``createcachetable`` and
   ``run_demo`` on the embedded defaults (SQLite, a SQLite broker and result store through
   SQLAlchemy, real workers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fail(message: str) -> None:
    sys.exit(f"check_package: {message}")


def tracked_package_files() -> set[str]:
    """``task_workflow/...`` paths git tracks, as they appear in a wheel."""
    out = subprocess.run(
        ["git", "ls-files", "task_workflow"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return {line for line in out.splitlines() if line and "__pycache__" not in line}


def check_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(tracked_package_files() - names)
    if missing:
        fail(f"{wheel.name} lacks {missing}")
    strays = sorted(n for n in names if n.startswith(("tests/", "example_project/", "benchmarks/")))
    if strays:
        fail(f"{wheel.name} holds files outside the app: {strays[:5]}")
    for required in ("task_workflow/py.typed", "task_workflow/migrations/0001_initial.py"):
        if required not in names:
            fail(f"{wheel.name} lacks {required}")
    if not any(n.startswith("task_workflow/templates/") for n in names):
        fail(f"{wheel.name} has no templates")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        fail(f"{wheel.name} has no LICENSE in its metadata")
    print(f"{wheel.name}: {len(names)} files, every tracked task_workflow file present")


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "task_workflow/py.typed"):
        if required not in names:
            fail(f"{sdist.name} lacks {required}")
    print(f"{sdist.name}: {len(names)} files, LICENSE, CHANGELOG.md and README.md present")


def run_example(wheel: Path, work: Path) -> None:
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", f"{wheel}[demo]"], check=True)
    project = work / "project"
    project.mkdir()
    shutil.copytree(
        ROOT / "example_project", project / "example_project", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy2(ROOT / "manage.py", project / "manage.py")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "PYTHONPATH")},
        "TASK_WORKFLOW_VAR_DIR": str(work / "var"),
        "EXAMPLE_TIMELINE": "1",  # run_demo prints its timeline (as `make demo` does)
    }

    def manage(*args: str) -> None:
        print("$ manage.py", *args, flush=True)
        subprocess.run([python, "manage.py", *args], cwd=project, env=env, check=True)

    where = subprocess.run(
        [python, "-c", "import task_workflow; print(task_workflow.__file__, task_workflow.__version__)"],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if not where[0].startswith(str(env_dir)):
        fail(f"task_workflow imported from {where[0]}, not from the installed wheel")
    print(f"task_workflow {where[1]} from {where[0]}")
    manage("check")
    manage("makemigrations", "--check", "--dry-run")
    manage("migrate", "--verbosity", "0")
    manage("createcachetable")
    manage("run_demo")


def main() -> None:
    dist = Path(sys.argv[1])
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        fail(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
    check_wheel(wheels[0])
    check_sdist(sdists[0])
    with tempfile.TemporaryDirectory(prefix="tw-package-") as work:
        run_example(wheels[0], Path(work))
    print("check_package: ok")


if __name__ == "__main__":
    main()
