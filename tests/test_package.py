"""The package's version has one source: pyproject.toml, read back from the installed metadata."""

import tomllib
from pathlib import Path

import jaxinfer


def test_version_is_the_one_in_pyproject():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert jaxinfer.__version__ == project["version"]
