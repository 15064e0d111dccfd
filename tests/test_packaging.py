"""Set-up and book configuration stay consistent: same pins everywhere, an offline book build."""

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-]+$")


def pyproject_pins() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_environment_yml_lists_pyprojects_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pyproject_pins() <= set(pip)


def test_lock_is_a_full_exact_pin_set_with_torch_2_13():
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert all(PIN.match(ln) for ln in lines), [ln for ln in lines if not PIN.match(ln)]
    assert "torch==2.13.0" in lines
    normalise = lambda pin: pin.lower().replace("_", "-")  # noqa: E731
    assert {normalise(p) for p in pyproject_pins()} <= {normalise(p) for p in lines}


def test_setup_scripts_parse():
    for script in ("atlas.sh", ".ci/run"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_book_config_builds_offline():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    assert ".*" in config["exclude_patterns"]
    sphinx = config["sphinx"]["config"]
    assert "intersphinx_mapping" not in sphinx
    assert not sphinx["mathjax_path"].startswith(("http:", "https:", "//"))


def test_the_atlas_command_is_the_book_packages_cli():
    """One front door: pyproject's `atlas` script is atlas_core.book.cli:main, and it resolves."""
    import importlib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["atlas"]
    module, _, name = target.partition(":")
    assert target == "atlas_core.book.cli:main"
    assert callable(getattr(importlib.import_module(module), name))
