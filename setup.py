"""perceiver_ar_t5x: Perceiver AR in Flax with a T5X-style trainer."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name: str) -> list[str]:
  lines = (_HERE / "requirements" / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="perceiver_ar_t5x",
    version="0.1.0",
    description="Perceiver AR (long-context autoregressive Transformer) in Flax, T5X-style.",
    long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["perceiver_ar_t5x", "perceiver_ar_t5x.*"]),
    python_requires=">=3.11",
    install_requires=_requirements("pins.txt"),
    extras_require={"test": _requirements("test.txt")},
    license="Apache-2.0",
)
