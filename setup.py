"""Distribution ``capgap``.

The repository keeps its code in top-level folders (``pipeline/``,
``transforms/``, ``models/``, ``configs/``); ``package_dir`` installs them as
``capgap.pipeline`` and so on, so no generic ``models`` or ``pipeline`` package
ever lands top-level in site-packages. Beam ships this file to workers with
``--setup_file ./setup.py``: the sdist it builds carries every module and config.
"""

from pathlib import Path

from setuptools import setup

PACKAGE_DIRS = {
    "capgap": "capgap",
    "capgap.core": "capgap/core",
    "capgap.pipeline": "pipeline",
    "capgap.transforms": "transforms",
    "capgap.transforms.readers": "transforms/readers",
    "capgap.models": "models",
    "capgap.configs": "configs",
}

REQUIRES = [
    "apache-beam>=2.60,<3",
    "torch>=2.4,<2.15",
    "torchvision>=0.19,<0.30",
    "open_clip_torch>=2.26,<4",
    "transformers>=4.45,<6",
    "pyarrow>=14",
    "datasets>=2.19",
    "numpy>=1.24",
    "pillow>=10.3",
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "scikit-learn>=1.3",
    "scipy>=1.11",
    "safetensors>=0.4",
    "braceexpand>=0.1.7",  # brace patterns in --input (what webdataset uses)
]

setup(
    name="capgap",
    version="0.1.0",
    description="Curate image-text pairs to close the modality gap of CLIP-style models.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"capgap.configs": ["*.yaml", "models/*.json", "runners/*.yaml"]},
    include_package_data=True,
    install_requires=REQUIRES,
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "import-linter>=2.1",
            "webdataset>=0.2.86",  # tests write tar inputs and read the tar export with it
            "polars>=1.0",  # tests read the outputs with it
        ],
        "gcp": ["apache-beam[gcp]>=2.60,<3"],
        "spark": ["pyspark>=3.4"],
        "flink": [],
    },
    entry_points={"console_scripts": ["capgap = capgap.pipeline.cli:entry"]},
)
