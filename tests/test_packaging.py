"""The wheel installs everything under ``sessionq.*`` and nothing top-level.

A host MCP server with its own ``models``, ``workers`` and ``cli`` must be able to
import both its own packages and sessionq's side by side: we build the real wheel,
install it into a fresh virtual environment and import every module from a directory
that holds such a host application.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The only top-level names the wheel may install.
ALLOWED_TOP_LEVEL = {"sessionq"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built with pip (isolated build) from a clean copy of this
    checkout: an in-tree build/ left by an earlier build could carry stale modules."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "node_modules", ".mypy_cache", ".ruff_cache"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("mcp_sessionq-*.whl")
    return path


def test_wheel_installs_only_the_sessionq_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == ALLOWED_TOP_LEVEL
    # Tests and ops are never packaged; the four wings are.
    assert not [n for n in names if n.startswith(("sessionq/tests/", "sessionq/ops/"))]
    for module in ("sessionq/cli.py", "sessionq/models/store.py", "sessionq/workers/actors.py",
                   "sessionq/scheduler/runner.py", "sessionq/workers/mcp/__init__.py"):
        assert module in names
    # The console's templates and static assets ship with it (package data, not modules).
    console = Path(ROOT / "workers" / "console")
    for asset in [*console.glob("templates/*.html"), *console.glob("static/*")]:
        assert f"sessionq/workers/console/{asset.relative_to(console)}" in names
    assert "sessionq/workers/console/templates/base.html" in names
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "sessionq = sessionq.cli:main" in entry_points


def test_wheel_imports_beside_a_host_application_with_the_same_names(wheel: Path, tmp_path: Path) -> None:
    # Given a fresh venv holding only the wheel (its dependencies come from this test's
    # environment through a path file, so nothing is downloaded) ...
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    # ... and a host application whose own packages are called models, workers and cli,
    host = tmp_path / "hostapp"
    for package in ("models", "workers"):
        (host / package).mkdir(parents=True)
        (host / package / "__init__.py").write_text(f"AgentState = 'host {package}'\n")
    (host / "cli.py").write_text("def main():\n    return 'host cli'\n")
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import cli, models, workers
        assert models.AgentState == "host models" and workers.AgentState == "host workers"
        assert cli.main() == "host cli"
        import sessionq.models
        from sessionq.models import AgentState
        assert AgentState.__module__ == "sessionq.models.records", AgentState.__module__
        assert "/site-packages/sessionq/" in sessionq.models.__file__, sessionq.models.__file__
        names = ["sessionq.cli"] + [
            info.name for package in ("sessionq.models", "sessionq.workers", "sessionq.scheduler")
            for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
        ]
        for name in names:
            importlib.import_module(name)
        # The console finds its templates and static files inside the installed package.
        from sessionq.workers.console.rendering import HERE, environment
        assert "/site-packages/sessionq/workers/console" in str(HERE), HERE
        assert "sessionq console" in environment().get_template("signin.html").render(csrf="x", path="/ui/signin")
        assert (HERE / "static" / "console.css").is_file() and (HERE / "static" / "console.js").is_file()
        # The host's modules are still its own after sessionq loaded everything.
        assert sys.modules["models"].AgentState == "host models"
        print(len(names))
        """
    )
    # When every sessionq module is imported from the host's directory,
    done = subprocess.run([str(python), "-c", script], cwd=host, capture_output=True, text=True, timeout=300)
    # then both sides import, and the console script runs from the wheel.
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 40
    version = subprocess.run([str(venv / "bin" / "sessionq"), "--version"], cwd=host, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and "version" in version.stdout, version.stderr
