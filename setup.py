"""Package discovery for the fixed source layout; pyproject.toml holds everything else.

The import names all live under ``interlingua`` while the sources keep their top-level
folders, so each folder is a root mapped to a package (``ROOTS``) and every package below
a root is found with ``find_packages``: a new subpackage (``server/transforms/torch/``)
ships without editing a list. ``tests/test_deploy.py`` builds the wheel and checks that
every module is in it. pyproject.toml cannot say this alone: its ``find`` names packages
relative to ``where``, with no prefix.
"""

from setuptools import find_packages, setup

ROOTS = {"interlingua": "proto/interlingua", "interlingua.server": "server", "interlingua.client": "client"}

setup(
    package_dir=ROOTS,
    packages=[f"{name}.{sub}" if sub else name for name, root in ROOTS.items() for sub in ["", *find_packages(root)]],
)
