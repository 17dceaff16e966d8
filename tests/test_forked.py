"""tests/forked.py: a forked run reports what a new interpreter would, its failures included."""

from __future__ import annotations

from pathlib import Path

from tests.forked import run_module


def test_a_run_gives_its_output_exit_status_and_errors(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text('{"b": 1, "a": [2]}')
    (tmp_path / "bad.json").write_text("{not json")

    good = run_module("json.tool", "--sort-keys", "good.json", cwd=tmp_path)
    missing = run_module("json.tool", "missing.json", cwd=tmp_path)
    bad = run_module("json.tool", "bad.json", cwd=tmp_path)

    assert (good.returncode, good.stdout, good.stderr) == (0, '{\n    "a": [\n        2\n    ],\n    "b": 1\n}\n', "")
    assert good.args == ["python", "-m", "json.tool", "--sort-keys", "good.json"]
    assert missing.returncode == 2, "argparse's exit status"
    assert "missing.json" in missing.stderr
    assert bad.returncode == 1, "a SystemExit with a message"
    assert "Expecting property name" in bad.stderr


def test_each_run_has_the_environment_it_is_given(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nprint(os.environ.get('FORKED_VALUE'), os.getcwd(), sys.argv[1:])\n")

    first = run_module("show", "one", cwd=tmp_path, env={"FORKED_VALUE": "a"})
    second = run_module("show", cwd=tmp_path, env={})

    assert first.stdout.split() == ["a", str(tmp_path), "['one']"]
    assert second.stdout.split() == ["None", str(tmp_path), "[]"]
