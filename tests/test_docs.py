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
