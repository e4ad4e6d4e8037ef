"""Package discovery for the layout in DESIGN.md: ir/, passes/ and backends/ are top-level folders installed as
xbitc.ir, xbitc.passes and xbitc.backends. Subpackages are found, not listed, so a new one is never left out of the
wheel (tests/test_packaging.py builds and installs it)."""
from setuptools import find_packages, setup

ROOTS = {"xbitc": "xbitc", "xbitc.ir": "ir", "xbitc.passes": "passes", "xbitc.backends": "backends"}

packages = []
for name, folder in ROOTS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder) if f"{name}.{sub}" not in ROOTS]

setup(packages=packages, package_dir=ROOTS)
