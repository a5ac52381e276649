"""fm_adapt: adapting vision foundation models to medical image analysis (JAX/Flax)."""
import setuptools

setuptools.setup(
    name="fm_adapt",
    version="0.1.0",
    description="Adapt vision foundation models to medical images with JAX/Flax.",
    packages=setuptools.find_packages(include=["fm_adapt", "fm_adapt.*", "data_pipelines", "data_pipelines.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        "array_record>=0.8,<0.9",
        "grain>=0.2.18,<0.3",
        "ml_collections>=1.1,<2",
        "numpy>=2.0,<3",
        "ml_dtypes>=0.5,<1",
        "etils[epath]>=1.7,<2",
        "scikit-learn>=1.5,<2",
        "scipy>=1.11,<2",
        "matplotlib>=3.9,<4",
        "pillow>=10,<13",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "absl-py>=2.1,<3",
        "tensorboardX>=2.6,<3",
    ],
    extras_require={
        # pytest-xdist: the README's test command runs on 2 workers; filelock: JAX's lock of
        # the XLA cache the test processes share (tests/fm_adapt/conftest.py).
        "dev": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "filelock>=3.12,<4",
                "chex>=0.1.90,<0.2"],
        # Reading .pth checkpoints. torch.load(weights_only=True) before 2.6 can run code from a
        # crafted file (CVE-2025-32434); fm_adapt.weights.readers refuses such a torch.
        "torch": ["torch>=2.6,<3"],
        # Workdirs and data on gs:// (etils.epath via gcsfs; orbax asks google-cloud-storage
        # about the bucket, tensorboardX writes events through it).
        "gcs": ["gcsfs>=2024.6", "google-cloud-storage>=2.14,<4"],
        # The PyTorch oracles of the tests (ResNet vs torchvision-style models, .pth reading; the
        # foundation-model importers against timm, open_clip and transformers at random
        # initialisation): exact pins, the CPU torch CI installs (a looser range can pull a
        # multi-GB CUDA build). timm and open_clip pull torchvision, whose only PyPI build for
        # torch 2.13.0 links libtorch_cuda and fails to import beside CPU torch; the oracle tests
        # never call it (tests/fm_adapt/weights/conftest.py stands in for it, raising on use).
        # Together ~190 MB installed, ~35 MB of wheels.
        "test": ["torch==2.13.0", "timm==1.0.29", "open_clip_torch==3.3.0",
                 "transformers==5.17.0"],
    },
)
