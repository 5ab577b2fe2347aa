"""The setup the README's two commands do: what `make demo` and `make test` install, and the pinned dependency set."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# What the Makefile installs from TORCH_SPEC, and the editable project itself: not pinned in constraints.txt.
UNPINNED = {"torch", "triton", "k2batch", "setuptools", "wheel"}


def planned_commands(target: str, tmp_path: Path) -> str:
    """The commands `make TARGET` would run for a fresh virtual environment (make -n runs none of them)."""
    result = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_demo_installs_no_browser(tmp_path):
    commands = planned_commands("demo", tmp_path)
    assert "k2batch demo" in commands and "bubblewrap" in commands
    assert "chromium" not in commands and ".[dev" not in commands


def test_tests_install_the_dev_extra_and_a_browser(tmp_path):
    commands = planned_commands("test", tmp_path)
    assert '-e ".[dev,s3,dagster]"' in commands and "chromium" in commands and "pytest" in commands


@pytest.mark.parametrize("target", ["demo", "test"])
def test_every_pip_install_uses_the_constraints(target, tmp_path):
    installs = [line for line in planned_commands(target, tmp_path).splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def test_constraints_pin_exactly_the_environment_the_tests_run_in():
    """Every distribution installed here is pinned at its installed version, and nothing else is pinned: a
    dependency added or upgraded without `make constraints` fails here."""
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}
    expected = {name: version for name, version in installed.items() if name not in UNPINNED}
    assert pins() == expected


def test_constraints_leave_torch_to_torch_spec():
    makefile = (REPO / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.MULTILINE)
    assert spec and "torch==" in spec.group(1)
    assert not {"torch", "triton"} & set(pins())


def repository_text() -> dict[str, str]:
    """Every file of the repository that git tracks or would track (not ignored), as text."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {name: (REPO / name).read_bytes().decode("utf-8", "replace") for name in listed if (REPO / name).is_file()}


def test_nothing_in_the_repository_points_outside_it():
    """A clone is the whole project: no file names the workspace it was developed in or a sibling folder."""
    pointers = re.compile(r"\.\./shared|/work/(main|shared)")
    assert [name for name, text in repository_text().items() if pointers.search(text)] == []


def test_the_readme_links_the_design_document_it_ships():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\(([^)#]+)", readme))
    assert "docs/DESIGN.md" in linked and all((REPO / path).exists() for path in linked)
