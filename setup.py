"""setuptools: ships ``conf/`` (the Hydra config tree, kept at the top of the repository) inside the wheel.

``conf/`` is installed as the package ``alignlab_conf`` (a ``package_dir`` mapping, which pyproject's
``packages.find`` cannot express), so an installed ``alignlab`` finds its configs via ``pkg://alignlab_conf``.
Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["alignlab", "alignlab.*"]), "alignlab_conf"],
    package_dir={"alignlab_conf": "conf"},
    package_data={"alignlab": ["assets/**/*"], "alignlab_conf": ["**/*.yaml"]},
)
