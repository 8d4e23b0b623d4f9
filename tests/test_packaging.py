"""Packaging: `pip install .` ships conf/ and recipes/ and prints no warnings of our own packaging."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

from helpers import ROOT


def test_every_conf_folder_is_a_listed_package():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {f"engine_factory.conf.{p.name}" for p in (ROOT / "conf").iterdir() if p.is_dir()}
    assert folders <= set(packages), f"add to [tool.setuptools] packages: {sorted(folders - set(packages))}"


def test_every_python_package_is_listed():
    """A subpackage missing from the explicit list works in the editable checkout and is absent from the wheel."""
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {init.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for top in ("runtime", "engine_factory") for init in (ROOT / top).rglob("__init__.py")}
    assert found <= packages, f"add to [tool.setuptools] packages: {sorted(found - packages)}"


def test_wheel_builds_quietly_and_holds_every_config(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    noise = [line for line in (p.stdout + p.stderr).splitlines() if "warn" in line.lower().replace(str(tmp_path).lower(), "")]
    assert not noise, "\n".join(noise[:20])
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"engine_factory/conf/{f.relative_to(ROOT / 'conf').as_posix()}" for f in (ROOT / "conf").rglob("*.yaml")}
    want |= {f"engine_factory/recipes/{f.name}" for f in (ROOT / "recipes").glob("*.yaml")}
    want |= {f.relative_to(ROOT).as_posix() for top in ("runtime", "engine_factory") for f in (ROOT / top).rglob("*.py")}
    assert want <= names, sorted(want - names)[:5]


def test_editable_install_is_quiet_and_a_plain_path(tmp_path):
    """`make install` is an editable install: with conf/ and recipes/ linked into engine_factory/ (no package-dir
    mapping) setuptools writes a .pth of the checkout instead of an import finder, and says nothing (with a
    mapping it printed a 'Please be careful with folders ...' notice twice per fresh install)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "docs"))
    linked = src / "engine_factory" / "conf"
    assert linked.is_symlink() and (linked / "config.yaml").is_file()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    # no build isolation (no index needed): the backend runs in the new venv, with this environment's setuptools
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                        "--no-deps", "--no-build-isolation", "-e", str(src)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    noise = [line for line in (p.stdout + p.stderr).splitlines()
             if line.strip() and "Location 'file:" not in line]  # the machine's pip.conf, not our packaging
    assert not noise, "\n".join(noise[:20])
    (pth,) = (venv / "lib").glob("python*/site-packages/__editable__*engine_factory*.pth")
    assert pth.read_text().strip() == str(src.resolve())
