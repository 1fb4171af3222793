"""Installable package for the Kosmos-2 research framework (`kosmos2` library + `fairseq_plugins`)."""
from setuptools import find_packages, setup

setup(
    name="kosmos2",
    version="0.1.0",
    description="A faithful, modern re-implementation of Kosmos-2 (grounded multimodal LLM): model, data, training, evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["kosmos2", "kosmos2.*", "fairseq_plugins", "fairseq_plugins.*"]),
    # the model presets, and the CPU kernels' sources and headers (compiled on first use: kosmos2/cpu/extension.py)
    package_data={"kosmos2": ["presets/*.json"], "kosmos2.cpu": ["csrc/*.cpp", "csrc/*.h"]},
    entry_points={"console_scripts": [
        "kosmos2-generate = kosmos2.generate:main",
        "kosmos2-convert = kosmos2.convert:main",
    ]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "open_clip_torch>=2.20",
        "sentencepiece",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "infinibatch",
    ],
    extras_require={"train": ["hydra-core", "omegaconf", "tensorboardX"], "demo": ["gradio"], "eval": ["pycocotools", "pycocoevalcap"]},
)
