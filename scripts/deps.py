"""Prints the pip requirements of pyproject.toml: the runtime dependencies
plus the optional groups named on the command line (e.g. ``test dev``).
Keeps the Makefile's install list in one place: pyproject.toml."""

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]

reqs = list(project.get("dependencies", []))
for group in sys.argv[1:]:
    reqs += project.get("optional-dependencies", {}).get(group, [])
print("\n".join(dict.fromkeys(reqs)))
