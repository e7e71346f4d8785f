from setuptools import setup

setup(
    name="vllm-compilation",
    version="0.1.0",
    description=(
        "vLLM 0.17.x with every compile range compiled up front (upstream PR #35472), "
        "as a patch series applied at import"
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["vllm_compilation", "vllm_compilation.patches"],
    package_dir={"vllm_compilation.patches": "patches"},
    package_data={"vllm_compilation.patches": ["vllm-0.17/*"]},
    install_requires=["vllm>=0.17.0,<0.18"],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "pytest-mock",  # vLLM's own tests/compile (tests/upstream) use its `mocker`
            "hypothesis>=6",
            "tlparse",
            "ruff",
            "matplotlib>=3.5",  # tests/test_demo.py runs `bench --plot`
        ],
        "bench": ["matplotlib>=3.5"],  # `vllm-compilation bench --plot`
    },
    entry_points={
        "vllm.general_plugins": ["vllm_compilation = vllm_compilation.plugin:register"],
        "pytest11": ["vllm_compilation = vllm_compilation.pytest_plugin"],
        "console_scripts": ["vllm-compilation = vllm_compilation.cli:main"],
    },
)
