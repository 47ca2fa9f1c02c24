"""What the d2r distribution installs: its own packages under their own names, nothing else.

d2r is installed into its own environment (docs/architecture.md, "Packaging"); these checks keep
the wheel from shipping folders that are not the product (``tests``, ``bench``, ``fuzz``, the
``models`` folder of the demo checkpoint) and catch another distribution that installs a module
under one of d2r's top-level names.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def product_packages() -> set[str]:
    """The top-level packages ``pyproject.toml`` declares."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {name for name in include if "." not in name and "*" not in name}


def test_the_declared_packages_are_the_product_folders() -> None:
    declared = product_packages()
    assert {"worker", "dicom_node", "model", "trt_build", "training", "d2r_core", "studydb"} <= (
        declared
    )
    assert not declared & {"tests", "bench", "fuzz", "models", "deploy", "scripts"}
    for name in declared:
        assert (ROOT / name / "__init__.py").is_file(), name


def test_the_installed_distribution_has_exactly_those_top_level_names() -> None:
    top_level = set((metadata.distribution("d2r").read_text("top_level.txt") or "").split())
    assert top_level == product_packages()


def test_no_other_distribution_installs_a_d2r_package_name() -> None:
    owners = metadata.packages_distributions()
    for name in product_packages():
        assert set(owners.get(name, [])) == {"d2r"}, (name, owners.get(name))
