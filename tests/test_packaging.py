"""Packaging (issue 16): the license, the DeepSpeed configs inside the wheel and reachable by name, and every
third-party module the launch examples import covered by the documented extras."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from conftest import REPO

from flagm3.deepspeed_config import BUNDLED_DIR, bundled_config


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """``install_requires`` and ``extras_require`` of setup.py, read from its source."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    return ast.literal_eval(kwargs["install_requires"]), ast.literal_eval(kwargs["extras_require"])


def distribution(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_license_is_the_apache_2_0_text():
    text = (REPO / "LICENSE").read_text()
    assert text.strip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000
    assert 'license="Apache-2.0"' in (REPO / "setup.py").read_text()


def test_stage_names_resolve_to_the_bundled_configs(tmp_path, monkeypatch):
    for stage in (1, 2, 3):
        for name in (f"stage{stage}", f"zero{stage}", f"ds_stage{stage}.json"):
            assert bundled_config(name) == str(BUNDLED_DIR / f"ds_stage{stage}.json")
        assert (BUNDLED_DIR / f"ds_stage{stage}.json").is_file()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_stage2.json").write_text("{}")  # a file of the user's wins
    assert bundled_config("ds_stage2.json") == "ds_stage2.json"
    assert bundled_config("configs/stage2") == "configs/stage2"  # a path is a path
    assert bundled_config("my.json") == "my.json"


def test_deepspeed_stage2_on_the_command_line_uses_the_bundled_file():
    pytest.importorskip("deepspeed")
    from flagm3.train import parse_args

    _, _, args = parse_args(["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o",
                             "--use_cpu", "True", "--deepspeed", "stage2"])
    assert args.deepspeed == str(BUNDLED_DIR / "ds_stage2.json")
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_license(tmp_path):
    source = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the repo
    shutil.copytree(REPO / "flagm3", source / "flagm3", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md", "LICENSE", "pyproject.toml"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("flagm3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for stage in (1, 2, 3):
        assert f"flagm3/deepspeed_configs/ds_stage{stage}.json" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)


# The Python files the launch examples run (their default training file is built by bench/make_cranfield_train.py).
EXAMPLE_FILES = ["bench/make_cranfield_train.py", "bench/bm25_baseline.py", "bench/common.py"]
NOT_RUN = {"pytrec_eval"}  # bench/common.py's evaluate(), which building the training file never calls


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_launch_examples_need_only_the_documented_extras():
    required, extras = setup_requirements()
    allowed = {distribution(r) for r in required + extras["examples"] + extras["deepspeed"]}
    local = {p.stem for p in (REPO / "bench").glob("*.py")} | {"flagm3"}
    owners = packages_distributions()
    missing = {}
    for file in EXAMPLE_FILES:
        for module in imported_modules(REPO / file) - local - NOT_RUN - set(sys.stdlib_module_names):
            dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
            if not dists & allowed:
                missing[module] = file
    assert not missing, f"imported by the launch examples but in no documented extra: {missing}"
    readme = (REPO / "examples" / "launch" / "README.md").read_text()
    assert "pip install 'flagm3[examples]'" in readme
