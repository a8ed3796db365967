"""Kept for tools that still call setup.py; the metadata lives in pyproject.toml [project].

scripts/setup_env.sh hashes this file into its stamp, so it stays (and stays tiny).
"""

import setuptools

setuptools.setup()
