"""What a wheel built from the repository ships: the recipes (`--recipe lemoe` by name), the calibration
data and its sources, the embedded fact-world model; and no path of the machine that built it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a path of a machine looks like (built here, so that this file does not name one itself).
MACHINE_PATHS = [str(ROOT).encode(), str(Path.home()).encode() + b"/", *(b"/" + d + b"/" for d in (b"tmp", b"work"))]


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
    for name in wheel.namelist():
        if not name.endswith(".gz"):  # compressed bytes can hold anything by chance
            data = wheel.read(name)
            assert not [n for n in MACHINE_PATHS if n in data], name


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed in it; its dependencies are this environment's (a path file
    adds this site-packages after the venv's own, without running its path files, so the repository's
    editable install is not seen)."""
    import site
    import sysconfig

    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pip must not see a checkout's moecli
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-deps", "-q", wheel.filename], capture_output=True, text=True, env=clean)
    if done.returncode != 0:
        pytest.skip(f"cannot install the wheel here: {done.stderr.strip().splitlines()[-1:]}")
    target = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path"
                                  "('purelib'))"], check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_path("purelib"), *site.getsitepackages()}
    (target / "deps_from_test_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def test_the_installed_wheel_edits_with_a_recipe_by_name(installed, tmp_path):
    env = {"PATH": str(installed / "bin"), "HOME": str(tmp_path), "MOECLI_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(installed / "bin" / "python"), "-c", "import moecli; print(moecli.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(str(installed)), done.stderr  # the wheel's moecli
    done = subprocess.run([str(installed / "bin" / "moecli"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "lifelong" in done.stdout, done.stderr
    done = subprocess.run([str(installed / "bin" / "moecli"), "--threads", "1", "edit", "--recipe", "lemoe",
                           "--prompt", "Irene Dubois lives in", "--target", "Milan", "--subject", "Irene Dubois",
                           "--out", "run", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rel"] == 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_no_tracked_file_names_a_path_of_a_machine():
    """Reports, results, fixtures and shipped keys carry no absolute path of the machine that made them."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{name}: {n.decode()}" for n in MACHINE_PATHS if n in data]
    assert found == []
