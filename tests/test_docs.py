"""The README and test_input.json cannot drift from the code."""

from __future__ import annotations

import json
import re

from src import docs
from src.schema import parse_input
from src.settings import load_settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_tables_match_the_schema_and_settings() -> None:
    assert docs.render(README) == README, "README tables are stale: run `python -m src.docs`"


def test_readme_input_table_lists_every_request_field() -> None:
    table = README.split("<!-- inputs:start -->")[1].split("<!-- inputs:end -->")[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert documented == list(docs.GenerateRequest.model_fields)


def test_test_input_json_validates() -> None:
    job = json.loads((ROOT / "test_input.json").read_text(encoding="utf-8"))

    request = parse_input(job, load_settings({}))

    assert request.prompt


def test_ci_runs_the_readme_test_command() -> None:
    [command] = re.findall(r"\*\*Test\*\*.*?```bash\n(.+?)\n```", README, flags=re.DOTALL)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

    assert command in ci.splitlines()


def test_readme_states_the_run_commands() -> None:
    assert "pip install -r requirements.txt\npython handler.py" in README
    assert "--rp_serve_api" in README
    assert "python -m builder.tiny_model" in README
