"""The ``vllm-compilation`` command as a user meets it: status where vLLM is broken or the
plugin filtered, export misuse, --version, every subcommand's help.

Status runs in real processes, as a user runs it; argument handling runs in this process.
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import run_python
from vllm_compilation.tools import cli

STATUS = ["-m", "vllm_compilation.tools.cli", "status"]


def _broken_torch(tmp_path: Path) -> Path:
    """A torch that cannot be imported (a broken CUDA library, a half-finished upgrade)."""
    torch = tmp_path / "broken" / "torch"
    torch.mkdir(parents=True)
    (torch / "__init__.py").write_text(
        'raise ImportError("libtorch_cuda.so: cannot open shared object file")\n'
    )
    return torch.parent


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_status_reports_a_vllm_that_cannot_be_imported(tmp_path: Path, as_json: bool) -> None:
    args = STATUS + (["--json"] if as_json else [])
    proc = run_python(args, env={"PYTHONPATH": str(_broken_torch(tmp_path))})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    if as_json:
        report = json.loads(proc.stdout)
        assert report["active"] is False
        assert "libtorch_cuda.so" in report["vllm_import_error"]
    else:
        first = proc.stdout.splitlines()[0]
        assert first.startswith("vllm-compilation: inactive (vLLM cannot be imported: ")
        assert "ImportError: libtorch_cuda.so: cannot open shared object file" in first
        assert "0.17" in proc.stdout  # the version is read from the files, not by importing


@pytest.mark.parametrize(
    ("plugins", "shown", "loads", "active"),
    [
        ("other,vllm_compilation", "VLLM_PLUGINS='other,vllm_compilation'", True, True),
        ("other, vllm_compilation", "VLLM_PLUGINS='other, vllm_compilation'", False, False),
        ("", "VLLM_PLUGINS='' (vLLM loads no plugin)", False, False),
    ],
    ids=["listed", "listed-with-a-space", "empty"],
)
def test_status_says_what_vllm_does_with_vllm_plugins(
    plugins: str, shown: str, loads: bool, active: bool
) -> None:
    """vLLM splits VLLM_PLUGINS at commas and compares names exactly (no stripping)."""
    proc = run_python(STATUS, env={"VLLM_PLUGINS": plugins})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"vllm-compilation: {'active' if active else 'inactive'}")
    (plugin,) = [ln for ln in lines if ln.startswith("plugin:")]
    assert shown in plugin
    assert ("vLLM loads it" if loads else "vLLM does NOT load it") in plugin
    if plugins == "other, vllm_compilation":
        assert "' vllm_compilation'" in plugin and "space" in plugin
    (cache,) = [ln for ln in lines if ln.startswith("cache:")]
    assert "None" not in cache
    if not active:
        assert cache.split(None, 1)[1] == "none (the fork is off)"


def test_export_under_a_regular_file_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    rc = cli.main(["export", str(tmp_path / "a-file" / "fork")])
    out, err = capsys.readouterr()
    assert rc == 1
    (line,) = err.splitlines()
    assert line.startswith("vllm-compilation export: ") and "a-file" in line


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split()[:2] == ["vllm-compilation", version("vllm-compilation")]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_help_has_a_description(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    command = _subcommands()[name]
    assert command.description, f"`{name} --help` has no description"
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    # argparse wraps it, at spaces and after hyphens
    assert "".join(command.description.split()) in "".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_default_is_shown_once(name: str) -> None:
    command = _subcommands()[name]
    formatter = command._get_formatter()
    for action in command._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        shown = formatter._expand_help(action)
        assert shown.lower().count("default") <= 1, (name, action.dest, shown)
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in shown.lower(), (name, action.dest, shown)
