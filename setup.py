import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def package_page(readme: str) -> str:
    """The README for the package page, where links relative to the repository lead nowhere.

    The docs are shipped in the wheel (``vllm_compilation/docs``), so a link to one becomes
    the command that prints it; other relative links name the file in the source
    distribution. Absolute links and in-page anchors are kept.
    """

    def replace(match: re.Match[str]) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|#", target):
            return match.group(0)
        path = target.split("#", 1)[0]
        if path.startswith("docs/") and path.endswith(".md"):
            return f"{text} (`vllm-compilation docs {Path(path).stem}`)"
        if path.startswith("patches/"):
            return f"{text} (installed with the package; `vllm-compilation index` lists them)"
        return f"{text} (`{path}` in the source distribution)"

    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", replace, readme)


setup(
    name="vllm-compilation",
    version="0.1.0",
    description=(
        "vLLM 0.17.x with every compile range compiled up front (upstream PR #35472), "
        "as a patch series applied at import"
    ),
    long_description=package_page((HERE / "README.md").read_text(encoding="utf-8")),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # every package under vllm_compilation/, plus the two mapped from patches/ and docs/
    packages=[
        *find_packages(include=["vllm_compilation", "vllm_compilation.*"]),
        "vllm_compilation.patches",
        "vllm_compilation.docs",
    ],
    package_dir={"vllm_compilation.patches": "patches", "vllm_compilation.docs": "docs"},
    package_data={
        "vllm_compilation.patches": ["vllm-0.17/*"],
        "vllm_compilation.docs": ["*.md"],
    },
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
            "wheel",  # tests/test_packaging.py builds the wheel with setuptools < 70.1 too
        ],
        "bench": ["matplotlib>=3.5"],  # `vllm-compilation bench --plot`
    },
    entry_points={
        "vllm.general_plugins": ["vllm_compilation = vllm_compilation.plugin:register"],
        "pytest11": ["vllm_compilation = vllm_compilation.pytest_plugin"],
        "console_scripts": ["vllm-compilation = vllm_compilation.tools.cli:main"],
    },
)
