from setuptools import find_packages, setup

setup(
    name="ep",
    version="0.1.0",
    description="A wave-pipelined expert-parallel Mixture-of-Experts runtime on PyTorch",
    packages=find_packages(include=["ep", "ep.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest>=8", "hypothesis>=6"], "bench": ["matplotlib>=3.7"]},
)
