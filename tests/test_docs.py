"""The README, the docs/ pages and test_input.json cannot drift from the code."""

from __future__ import annotations

import json
import re
import subprocess
from decimal import ROUND_HALF_UP, Decimal

import pytest

from src import docs
from src.schema import parse_input
from src.settings import load_settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
# The pages of docs/, by their path from the root: "docs/input.md", ...
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in docs.documents()[1:]}
# Every document that speaks of the software: the README, the docs/ pages and BENCHMARKS.md.
DOCUMENTS = {"README.md": README, **PAGES}
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
RESULTS = ROOT / "bench" / "results"

# The docs speak of the software and of measured facts (machine, date, command), not of who
# wrote them or the circumstances they were written in.
CIRCUMSTANCE_PHRASES = (
    "here had",
    "the 2-core cpu here",
    "the session",
    "this session",
    "development machine",
)


def test_the_docs_pages_are_found() -> None:
    assert {"docs/input.md", "docs/outputs.md", "docs/configuration.md"} <= set(PAGES)


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_generated_tables_match_the_schema_and_settings(name: str) -> None:
    assert docs.render(DOCUMENTS[name]) == DOCUMENTS[name], f"{name}: tables are stale: run `python -m src.docs`"


def test_every_generated_table_lives_in_a_document() -> None:
    assert docs.missing_tables(list(DOCUMENTS.values())) == []
    assert docs.main(["--check"]) == 0


def test_each_table_lives_on_the_page_that_uses_it() -> None:
    assert docs.tables_in(PAGES["docs/input.md"]) == ["inputs", "upscale_inputs"]
    assert docs.tables_in(PAGES["docs/configuration.md"]) == ["settings"]
    assert docs.tables_in(PAGES["docs/outputs.md"]) == ["outputs", "upscale_outputs"]


def test_upscale_tables_list_every_field_of_its_request_and_metadata() -> None:
    inputs = PAGES["docs/input.md"].split("<!-- upscale_inputs:start -->")[1].split("<!-- upscale_inputs:end -->")[0]
    outputs = (
        PAGES["docs/outputs.md"].split("<!-- upscale_outputs:start -->")[1].split("<!-- upscale_outputs:end -->")[0]
    )

    assert re.findall(r"^\| `(\w+)` \|", inputs, flags=re.MULTILINE) == list(docs.UpscaleRequest.model_fields)
    documented = re.findall(r"^\| `metadata\.(\w+)` \|", outputs, flags=re.MULTILINE)
    assert documented == list(docs.UpscaleMetadata.model_fields)


def test_input_table_lists_every_request_field() -> None:
    table = PAGES["docs/input.md"].split("<!-- inputs:start -->")[1].split("<!-- inputs:end -->")[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert documented == list(docs.GenerateRequest.model_fields)


def test_output_table_lists_each_field_once() -> None:
    table = PAGES["docs/outputs.md"].split("<!-- outputs:start -->")[1].split("<!-- outputs:end -->")[0]
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


def anchors(text: str) -> set[str]:
    """The link targets of a document's headings, as GitHub makes them: lower case, punctuation dropped."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_every_link_between_the_docs_reaches_its_file_and_heading(name: str) -> None:
    here = (ROOT / name).parent
    broken = []
    for target, fragment in re.findall(r"\]\(([\w./-]*?)(?:#([\w-]+))?\)", DOCUMENTS[name]):
        path = (here / target).resolve() if target else ROOT / name
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and fragment not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target}#{fragment}: no such heading")
    assert broken == []


def results_files_named(text: str) -> set[str]:
    """The files under bench/results/ that a document names; ``cpu.{md,json}`` names two."""
    names = set()
    for stem, endings, extension in re.findall(r"bench/results/([\w/-]+)\.(?:\{([\w,]+)\}|(\w+))", text):
        names |= {f"{stem}.{ending}" for ending in (endings.split(",") if endings else [extension])}
    return names


def test_docs_hold_no_sentence_about_who_wrote_them_or_when() -> None:
    for name, text in {**DOCUMENTS, "BENCHMARKS.md": BENCHMARKS}.items():
        found = [phrase for phrase in CIRCUMSTANCE_PHRASES if phrase in text.lower()]
        assert not found, f"{name} speaks of its circumstances: {found}"


def test_every_results_file_the_docs_name_is_committed() -> None:
    named = set().union(*(results_files_named(text) for text in (BENCHMARKS, *DOCUMENTS.values())))

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


# A figure is a number with a unit: a time, a size, a count in k or M, a percentage or a ratio
# (x, the multiplication sign, times). In a run such as "1.09 to 1.29 s" or "2.65, 3.39 and 2.65 GiB"
# each number is a figure.
NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
TIMES_SIGN, EN_DASH = "\u00d7", "\u2013"
UNIT = rf"ms|s|min|MiB|MB|GiB|GB|KB|k|M|%|x|{TIMES_SIGN}|times"
FIGURE_RUN = re.compile(
    rf"(?<![\w.])((?:{NUMBER})(?:(?:, | and | to | or |-|{EN_DASH})(?:{NUMBER}))*) ?({UNIT})(?![\w²])"
)
# A ratio may be derived when it shows its terms: "3.86x (319.6 / 82.7)"; each term is then a figure.
DERIVED = re.compile(rf"^ ?\(({NUMBER}) ?(?:{UNIT})? ?/ ?({NUMBER}) ?(?:{UNIT})?\)")
RESULTS_PATH = re.compile(r"bench/results/[\w/.{},-]+")


def decimal(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def values_in(text: str) -> set[Decimal]:
    """Every number in a results file, and each rounded to fewer decimals, as a document may quote it."""
    values = set()
    # Not the parts of a version or a name ("2.13.0+cpu", "x86_64").
    for token in re.findall(rf"(?<![\w.])(?:{NUMBER})(?!\.?\d)", text):
        value = decimal(token)
        values.add(value)
        places = -value.as_tuple().exponent  # type: ignore[operator]
        values |= {value.quantize(Decimal(1).scaleb(-kept), ROUND_HALF_UP) for kept in range(1, places)}
    return values


def units_of(text: str) -> list[tuple[str, set[str]]]:
    """The document split into paragraphs, list items and table rows, each with the results files it names.

    A table row also cites what its table's header row names.
    """
    units: list[tuple[str, set[str]]] = []
    block: list[str] = []
    header: set[str] = set()

    def flush() -> None:
        if block:
            joined = " ".join(block)
            units.append((joined, results_files_named(joined)))
            block.clear()

    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            flush()
            continue
        if in_code:
            continue
        if line.startswith("|"):
            flush()
            if re.match(r"^\|[ -|]+\|$", line):
                continue
            named = results_files_named(line)
            if not units or not units[-1][0].startswith("|"):
                header = named
            units.append((line, named | header))
        elif not line.strip() or line.startswith("#") or line.startswith("<"):
            flush()
        elif line.startswith("- "):
            flush()
            block.append(line)
        else:
            block.append(line)
    flush()
    return units


def cited_units(text: str, *, by_section: bool) -> list[tuple[str, set[str]]]:
    """``units_of`` the document; with ``by_section``, a unit naming no file cites those its section names."""
    if not by_section:
        return units_of(text)
    units = []
    for section in re.split(r"^(?=#{1,3} )", text, flags=re.MULTILINE):
        named = results_files_named(section)
        units += [(unit, own or named) for unit, own in units_of(section)]
    return units


def figures_not_in_their_files(text: str, *, by_section: bool = False) -> list[str]:
    """Figures of paragraphs, list items and table rows that cite results files, found in none of them."""
    cache: dict[str, set[Decimal]] = {}
    unfound = []
    for unit, named in cited_units(text, by_section=by_section):
        if not named:
            continue
        values = set()
        for name in named:
            if name not in cache:
                path = RESULTS / name
                # A plot holds no text: its figures are in the results files beside it.
                text = path.is_file() and path.suffix in (".md", ".json", ".txt")
                cache[name] = values_in(path.read_text(encoding="utf-8")) if text else set()
            values |= cache[name]
        prose = re.sub(r"`[^`]*`", "", unit)
        for run in FIGURE_RUN.finditer(prose):
            numbers, unit_name = run.group(1), run.group(2)
            derived = DERIVED.match(prose[run.end() :])
            for number in re.findall(NUMBER, numbers):
                if derived and unit_name in ("x", TIMES_SIGN, "times", "%"):
                    top, bottom = decimal(derived.group(1)), decimal(derived.group(2))
                    ratio = top / bottom * (100 if unit_name == "%" else 1)
                    last_place = Decimal(1).scaleb(decimal(number).as_tuple().exponent)  # type: ignore[arg-type]
                    if {top, bottom} <= values and abs(ratio - decimal(number)) <= last_place:
                        continue
                if decimal(number) not in values:
                    unfound.append(f"{number} {unit_name} in: {unit[:160]}")
    return unfound


def test_every_figure_of_a_paragraph_that_cites_results_is_in_those_files() -> None:
    """A paragraph, list item or table row naming bench/results/ files quotes them: each of its figures is in one.

    A figure is a number with a unit (s, ms, MB, GiB, k, M, %, x, the multiplication sign, times); it may be
    the file's number rounded to fewer decimals, or a ratio that shows its terms from the files: "3.86x (319.6 / 82.7)".
    """
    for name, text in DOCUMENTS.items():
        assert figures_not_in_their_files(text) == [], f"{name} quotes figures its results files do not hold"
    # BENCHMARKS.md says every figure in it is copied from a results file: a paragraph naming none
    # quotes the files its section names.
    assert figures_not_in_their_files(BENCHMARKS, by_section=True) == [], "BENCHMARKS.md quotes figures not held"


def test_the_figure_rule_catches_a_figure_missing_from_its_file() -> None:
    cited = "Encoding a 512² PNG takes {} (`bench/results/encode.md`)."

    assert figures_not_in_their_files(cited.format("22.4 ms")) == []
    assert figures_not_in_their_files(cited.format("22 ms")) != []
    assert figures_not_in_their_files(cited.format("about 28 ms")) != []
    assert figures_not_in_their_files(cited.format("3.86x (319.6 / 82.7)")) == []
    assert figures_not_in_their_files(cited.format("3.9x (319.6 / 82.7)")) == []
    assert figures_not_in_their_files(cited.format("4.5x (319.6 / 82.7)")) != []


COMMIT = re.compile(r"`([0-9a-f]{7,40})`")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def test_every_gpu_claim_names_the_commit_that_recorded_its_results() -> None:
    """A GPU result cannot be read off the code as it is now: each paragraph citing one names the commit that
    recorded it, a commit that added or changed that results file."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], check=False, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the commits cannot be looked up")
    problems = []
    for name, text in {**DOCUMENTS, "BENCHMARKS.md": BENCHMARKS}.items():
        for unit, named in units_of(text):
            gpu_files = sorted(file for file in named if file.startswith("gpu"))
            if not gpu_files:
                continue
            recorded = {
                line for file in gpu_files for line in git("log", "--format=%H", "--", f"bench/results/{file}").split()
            }
            commits = COMMIT.findall(unit)
            if not commits:
                problems.append(f"{name}: names no commit: {unit[:120]}")
            problems += [
                f"{name}: `{commit}` did not record {gpu_files}: {unit[:120]}"
                for commit in commits
                if not any(full.startswith(commit) for full in recorded)
            ]
    assert problems == []


def test_benchmarks_names_every_gpu_test_as_run_or_unrun() -> None:
    """Each case of tests/test_gpu.py is named in BENCHMARKS.md, so none is counted as passed by default."""
    source = (ROOT / "tests" / "test_gpu.py").read_text(encoding="utf-8")
    tests = re.findall(r"^def (test_\w+)", source, flags=re.MULTILINE)

    assert tests
    assert [test for test in tests if f"`{test}`" not in BENCHMARKS] == []
