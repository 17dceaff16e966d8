"""The README and test_input.json cannot drift from the code."""

from __future__ import annotations

import json
import re

from src import docs
from src.schema import parse_input
from src.settings import load_settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
RESULTS = ROOT / "bench" / "results"

# The docs speak of the software and of measured facts (machine, date, command), not of who
# wrote them or the circumstances they were written in.
CIRCUMSTANCE_PHRASES = (
    "had no gpu",
    "has not been run on a gpu",
    "here had",
    "the 2-core cpu here",
    "the session",
    "this session",
    "development machine",
)


def test_readme_tables_match_the_schema_and_settings() -> None:
    assert docs.render(README) == README, "README tables are stale: run `python -m src.docs`"


def test_readme_input_table_lists_every_request_field() -> None:
    table = README.split("<!-- inputs:start -->")[1].split("<!-- inputs:end -->")[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert documented == list(docs.GenerateRequest.model_fields)


def test_readme_output_table_lists_each_field_once() -> None:
    table = README.split("<!-- outputs:start -->")[1].split("<!-- outputs:end -->")[0]
    documented = re.findall(r"^\| `([\w.\[\]]+)` \|", table, flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), documented
    assert "`images[].nsfw` | boolean or null" in table


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


def results_files_named(text: str) -> set[str]:
    """The files under bench/results/ that a document names; ``cpu.{md,json}`` names two."""
    names = set()
    for stem, endings, extension in re.findall(r"bench/results/([\w/-]+)\.(?:\{([\w,]+)\}|(\w+))", text):
        names |= {f"{stem}.{ending}" for ending in (endings.split(",") if endings else [extension])}
    return names


def test_docs_hold_no_sentence_about_who_wrote_them_or_when() -> None:
    for name, text in (("README.md", README), ("BENCHMARKS.md", BENCHMARKS)):
        found = [phrase for phrase in CIRCUMSTANCE_PHRASES if phrase in text.lower()]
        assert not found, f"{name} speaks of its circumstances: {found}"


def test_every_results_file_the_docs_name_is_committed() -> None:
    named = results_files_named(BENCHMARKS) | results_files_named(README)

    assert {"cpu.md", "cpu.json"} <= named
    missing = sorted(name for name in named if not (RESULTS / name).is_file())
    assert not missing, f"named in the docs but not in bench/results/: {missing}"


def test_benchmarks_names_the_command_that_wrote_each_results_table() -> None:
    tables = sorted(RESULTS.rglob("*.md"))

    assert tables
    for table in tables:
        name = table.relative_to(RESULTS).as_posix()
        [command] = re.findall(r"^Command: `([^`]+)`", table.read_text(encoding="utf-8"), flags=re.MULTILINE)
        assert f"`{command}`" in BENCHMARKS, f"BENCHMARKS.md does not name `{command}`, which wrote {name}"
        assert f"bench/results/{name}" in BENCHMARKS, f"BENCHMARKS.md does not cite bench/results/{name}"


def test_benchmarks_tables_are_the_committed_results() -> None:
    """The tables in BENCHMARKS.md are copied from the results files, so no figure drifts from them."""
    for table in sorted(RESULTS.rglob("*.md")):
        rows = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
        missing = [row for row in rows if row not in BENCHMARKS.splitlines()]
        assert not missing, f"rows of {table.relative_to(RESULTS)} missing from BENCHMARKS.md: {missing[:3]}"


def test_benchmarks_headline_figures_come_from_the_results() -> None:
    """Each bold figure of BENCHMARKS.md's summary is in a committed results file."""
    results = "\n".join(path.read_text(encoding="utf-8") for path in RESULTS.rglob("*.md"))
    figures = re.findall(r"\*\*([\d.]+)\*\*", BENCHMARKS)

    assert figures
    assert [figure for figure in figures if figure not in results] == []
