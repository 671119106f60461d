"""The wheel built from this tree holds what an install from it needs.

An editable install reads the source folders directly, so a module or data file left out of the
package list (or of package-data) would only show on a user's non-editable install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> import path it ships under (pyproject's package-dir mapping).
SHIPPED_FOLDERS = {"vqfast": "vqfast", "kernels": "vqfast/kernels", "models": "vqfast/models"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools builds in the source folder, and files a build left there
    # earlier would end up in the wheel even after the package lists stopped naming them.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "gpu-out", "gpu_data",
        ".whl", "data", ".triton-cache"))
    # No build isolation: the dev extra installs setuptools, and tests must not download.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (path,) = out.glob("vqfast-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_ships_every_module_and_data_file(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    expected = {"vqfast/py.typed", "vqfast/models/assets/cifar10_sample_2k.npz"}
    for folder, target in SHIPPED_FOLDERS.items():
        modules = sorted((ROOT / folder).glob("*.py"))
        assert modules, folder
        expected |= {f"{target}/{module.name}" for module in modules}
    assert expected - names == set()
    # The MIT license's text travels with the package (setuptools picks up LICENSE by name).
    assert [name for name in names if name.endswith(("dist-info/LICENSE", "dist-info/licenses/LICENSE"))]
    # Nothing from the tests or benchmarks is installed into site-packages.
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/"))]


def test_wheel_metadata_names_the_runtime_dependencies_and_the_script(wheel: zipfile.ZipFile) -> None:
    (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    required = {req.split(";")[0].split(">")[0].split("=")[0].strip() for req in metadata.get_all("Requires-Dist")
                if "extra ==" not in req}
    assert {"torch", "torchvision", "triton", "numpy", "tqdm", "matplotlib"} <= required
    assert metadata["Requires-Python"] == ">=3.10"
    (entry_points_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = wheel.read(entry_points_name).decode()
    assert "vqfast = vqfast.cli:main" in entry_points
