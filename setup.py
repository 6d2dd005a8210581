from setuptools import find_packages, setup

setup(
    name="gama_ds",
    version="0.1.0",
    description="DeepSpeed trainer for GAMA-style audio-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gama_ds", "gama_ds.*"]),
    package_data={"gama_ds": ["recipes/*.yaml", "ds_configs/*.json"]},
    # Pinned to a set that installs and imports together (see README). torch and
    # torchaudio are a matching pair; a local build such as 2.11.0+cu126 satisfies the pin.
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "peft==0.21.2",
        "accelerate==1.15.0",
        "webdataset==1.0.2",
        "xxhash==4.1.0",
        "soundfile==0.14.0",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "safetensors==0.8.0",
        "pyyaml==6.0.3",
        "tqdm==4.70.1",
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",
    ],
    extras_require={
        "flash": ["flash-attn==2.8.3.post2"],
        "dev": ["pytest==9.2.0", "ruff==0.17.5"],
    },
    entry_points={"console_scripts": ["gama-ds=gama_ds.cli:main"]},
)
