"""ms-mm: a MindSpore-native training backend for large multimodal models."""
from setuptools import find_packages, setup

setup(
    name="ms-mm",
    version="0.1.0",
    description="MindSpore-native training backend for Qwen2.5-VL, DeepSeek-VL2, BAGEL and Lumina-mGPT 2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["ms_mm", "ms_mm.*", "adapters", "adapters.*", "convert", "convert.*"]),
    include_package_data=True,
    package_data={"ms_mm": ["assets/**/*", "assets/*"]},
    install_requires=[
        "mindspore==2.9.0",
        "mindformers==1.9.0",
        "transformers==4.57.1",
        "numpy<2",
        "safetensors",
        "pyarrow",
        "pillow",
        "tensorboardX",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "tensorboard"]},  # tensorboard: the tests read event files back
    entry_points={
        "console_scripts": [
            "mm-convert=convert.cli:main",
            "mm-parity=convert.parity:main",
        ]
    },
)
