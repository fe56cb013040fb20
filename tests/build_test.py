"""BUILD stays true to the tree: Bazel cannot be installed offline here, so this test
evaluates the Starlark BUILD file as Python and checks its targets against the files, and
checks that BUILD is what tests/build_gen.py writes from the imports."""

import pathlib
import re

import pytest

import build_gen  # tests/ is on sys.path (prepend import mode)

ROOT = pathlib.Path(__file__).resolve().parents[1]
COVERED_DIRS = ("mm_tf", "bin", "bench", "tests")


def _requirement_names():
    """Distribution names of requirements.txt, normalised the way rules_python does."""
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[<>=\[;\s]", line, maxsplit=1)[0]
            names.add(name.lower().replace("-", "_").replace(".", "_"))
    return names


def load_build(path=ROOT / "BUILD"):
    """Evaluates BUILD with stub rules; returns {target name: (kind, attrs)}."""
    targets = {}

    def rule(kind):
        def add(name, **attrs):
            if name in targets:
                raise AssertionError(f"BUILD defines target {name!r} twice")
            targets[name] = (kind, attrs)
        return add

    def requirement(name):
        return "@pypi//" + name.lower().replace("-", "_").replace(".", "_")

    env = {"py_library": rule("py_library"), "py_binary": rule("py_binary"),
           "py_test": rule("py_test"), "requirement": requirement,
           "load": lambda *a, **k: None, "package": lambda **k: None,
           "exports_files": lambda *a, **k: None, "glob": lambda *a, **k: []}
    exec(compile(path.read_text(), str(path), "exec"), env)  # pylint: disable=exec-used
    return targets


@pytest.fixture(scope="module")
def targets():
    return load_build()


def test_every_python_file_is_in_a_target(targets):
    listed = {src for _, attrs in targets.values() for src in attrs.get("srcs", [])}
    missing = sorted(
        str(p.relative_to(ROOT)) for d in COVERED_DIRS for p in (ROOT / d).rglob("*.py")
        if "__pycache__" not in p.parts and str(p.relative_to(ROOT)) not in listed)
    assert not missing, f"BUILD lists no target for: {missing}"


def test_every_listed_source_exists(targets):
    for name, (_, attrs) in targets.items():
        for src in attrs.get("srcs", []) + attrs.get("data", []):
            if src.startswith((":", "//", "@")):
                continue
            assert (ROOT / src).exists(), f"target {name!r} lists missing file {src!r}"


def test_every_dep_names_a_target(targets):
    external = _requirement_names()
    for name, (_, attrs) in targets.items():
        for dep in attrs.get("deps", []):
            if dep.startswith("@pypi//"):
                assert dep[len("@pypi//"):] in external, (
                    f"target {name!r} depends on {dep!r}, which requirements.txt lacks")
            else:
                label = dep.split(":")[-1]
                assert dep.startswith((":", "//:")) and label in targets, (
                    f"target {name!r} depends on {dep!r}, which names no target")
        for data in attrs.get("data", []):
            if data.startswith(":"):
                assert data[1:] in targets, f"target {name!r} has data {data!r}, no target"


def test_binaries_and_tests_have_a_main(targets):
    for name, (kind, attrs) in targets.items():
        if kind in ("py_binary", "py_test"):
            main = attrs.get("main", attrs["srcs"][0])
            assert main in attrs["srcs"], f"{name!r}: main {main!r} not in srcs"


def test_the_checker_catches_a_broken_build(tmp_path):
    broken = tmp_path / "BUILD"
    broken.write_text('py_library(name="a", srcs=["mm_tf/nope.py"], deps=[":b"])\n')
    loaded = load_build(broken)
    assert loaded["a"][1]["deps"] == [":b"] and "b" not in loaded
    assert not (ROOT / "mm_tf/nope.py").exists()


def test_build_is_generated_from_the_imports():
    assert (ROOT / "BUILD").read_text() == build_gen.generate(), (
        "BUILD is out of date with the tree: run python tests/build_gen.py")


def test_the_generator_refuses_an_unknown_third_party_import(tmp_path):
    for folder in build_gen.SOURCE_DIRS:
        (tmp_path / folder).mkdir()
    (tmp_path / "mm_tf" / "__init__.py").write_text("")
    (tmp_path / "mm_tf" / "thing.py").write_text("import numpy\nimport some_new_package\n")
    with pytest.raises(SystemExit, match="mm_tf/thing.py.*some_new_package"):
        build_gen.generate(tmp_path)
    (tmp_path / "mm_tf" / "thing.py").write_text("import os\nimport numpy\n")
    text = build_gen.generate(tmp_path)
    assert 'name = "mm_tf_thing"' in text and 'requirement("numpy")' in text
