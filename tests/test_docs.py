"""The README's links into the code and its test command stay true as the code moves."""
import os
import re

from helpers import ROOT


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_readme_links_to_code_lines_point_at_the_named_definition():
    links = re.findall(r"\[`([\w.]+)`\]\(([\w/]+\.py)#L(\d+)\)", read("README.md"))
    assert len(links) >= 10
    for name, path, line in links:
        text = read(path).splitlines()[int(line) - 1]
        assert re.search(rf"(def|class) {name.split('.')[-1]}\b", text), (name, path, line, text)


def test_ci_runs_exactly_the_readme_test_command():
    readme_command = re.search(r"pip install -r requirements-dev.txt && (python -m pytest[^\n`]*)", read("README.md"))
    ci_lines = [line.strip() for line in read(".ci/run").splitlines() if line.strip().startswith("python -m pytest")]
    assert readme_command and ci_lines == [readme_command.group(1).strip()]


def test_docs_have_no_clock_times_or_paths_outside_the_repository():
    for name in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]:
        text = read(name)
        assert not re.search(r"\(\d\d:\d\d\)|\b\d\d:\d\d\b (run|column)", text), name
        assert "../shared" not in text and "/work/" not in text, name


def test_pages_stay_short_and_every_table_labels_its_columns():
    # the README at most ~240 lines (a product page with one section a feature), each docs page at most ~300;
    # a markdown table starts with a header row
    # of names (no cell a bare number) followed by its |---| separator
    pages = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]
    for name in pages:
        lines = read(name).splitlines()
        assert len(lines) <= (240 if name == "README.md" else 300), (name, len(lines))
        in_code = False
        for i, line in enumerate(lines):
            in_code ^= line.startswith("```")
            starts_table = line.startswith("|") and not in_code and (i == 0 or not lines[i - 1].startswith("|"))
            if starts_table:
                header = [cell.strip() for cell in line.strip("|").split("|")]
                assert i + 1 < len(lines) and re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", lines[i + 1]), (name, i + 1)
                assert not any(re.fullmatch(r"[\d.,x%/ -]+", cell) for cell in header if cell), (name, i + 1, header)
