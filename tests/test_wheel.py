"""The wheel holds every module: pyproject.toml lists packages by hand (the folders are
remapped), so a subpackage missing there works in an editable install and is absent from
the installed package. Build the wheel, import each of its modules from it alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("nkv_format", "loaders", "editing", "cli")
# Modules that import an optional runtime at import time; imported only if it is installed.
NEEDS = {"nkv.loaders.vllm.routes": "fastapi"}


def _build_wheel(out: Path) -> Path:
    try:
        import setuptools  # noqa: F401  (the build backend; --no-build-isolation uses this one)
    except ImportError:
        pytest.skip("setuptools is not installed, so the wheel cannot be built without network")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = out.parent / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *SOURCE_FOLDERS):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=240, cwd=out)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = out.glob("nkv-*.whl")
    return wheel


def test_every_source_module_is_in_the_wheel_and_imports_from_it(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    in_wheel = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}

    # every .py file of the source folders is in the wheel, under its import name
    roots = {"nkv_format": "nkv", "loaders": "nkv.loaders", "editing": "nkv.editing", "cli": "nkv.cli"}
    in_tree = set()
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            in_tree.add(".".join([roots[folder], *parts]))
    assert in_tree - in_wheel == set(), "listed in the tree but not in the wheel: add them to pyproject's packages"

    # each module imports from the unpacked wheel alone, in a fresh interpreter
    importable = sorted(m for m in in_wheel if m not in NEEDS or _installed(NEEDS[m]))
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "sys.path = [p for p in sys.path if p not in ('', '.') and not p.startswith(" + repr(str(ROOT)) + ")]\n"
        "bad = []\n"
        f"for name in {importable!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    if not module.__file__.startswith({str(site)!r}):\n"
        "        bad.append((name, module.__file__))\n"
        "print(bad)\n"
    )
    # -S: no site-packages .pth files, so the editable install's path hooks cannot serve `nkv`;
    # the dependencies come from the environment's site-packages, added explicitly after the wheel.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    code = code.replace("bad = []\n", f"sys.path.extend({deps!r})\nbad = []\n", 1)
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None
