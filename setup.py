"""
setup.cfg holds the metadata. The package list lives here because it names
twisted.plugins, a namespace directory without __init__.py (one there would hide
every other plugin), which find_packages cannot see.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["keychestamp", "keychestamp.*"]) + ["twisted.plugins"],
)
