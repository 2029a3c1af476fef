"""What a wheel built from the repository ships: the recipes (`--recipe lemoe` by name), the calibration
data and its sources, the embedded fact-world model; and no path of the machine that built it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1:]}")
    return zipfile.ZipFile(next(out.glob("moecli-*.whl")))


def test_the_wheel_ships_every_recipe_and_asset(wheel):
    names = set(wheel.namelist())
    recipes = {p.name for p in (ROOT / "moecli" / "assets" / "recipes").glob("*.yaml")}
    assert recipes >= {"lemoe.yaml", "memoe.yaml", "scen.yaml", "locft.yaml"}
    assert {f"moecli/assets/recipes/{name}" for name in recipes} <= names
    assert {"moecli/assets/calibration/SOURCES.md", "moecli/assets/calibration/counterfact_train.json.gz",
            "moecli/assets/fact_world/model.safetensors"} <= names


def test_no_shipped_file_names_a_path_of_this_machine(wheel):
    home = str(Path.home()).encode()
    for name in wheel.namelist():
        data = wheel.read(name)
        assert str(ROOT).encode() not in data and b"/tmp/" not in data, name
        if not name.endswith(".gz"):
            assert home not in data, name
