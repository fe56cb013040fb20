"""Writes the repository's BUILD from the tree: one py_library per module, one py_binary
per script, one py_test per test file, deps read from the imports.

    python tests/build_gen.py          # rewrites BUILD
    python tests/build_gen.py --check  # exit 1 if BUILD differs from what it would write

tests/build_test.py fails when BUILD is not what this writes, so a new module, import or
test cannot leave BUILD behind. A third-party import must be named in `EXTERNAL` (its
requirements.txt distribution), else generation stops naming the file and the module.
"""

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mm_tf", "bin", "bench", "tests")
# Top-level import name -> requirements.txt distribution.
EXTERNAL = {"tensorflow": "tensorflow-cpu", "keras": "keras", "numpy": "numpy",
            "absl": "absl-py", "PIL": "pillow", "scipy": "scipy",
            "cityscapesscripts": "cityscapesscripts", "h5py": "h5py",
            "skimage": "scikit-image", "sklearn": "scikit-learn",
            "matplotlib": "matplotlib", "pytest": "pytest", "tf_keras_vis": "tf-keras-vis",
            "tensorboard": "tensorboard", "google": "protobuf"}
# Imported inside try/except ImportError, with a fallback: not a dependency.
OPTIONAL_IMPORTS = {"tqdm"}  # mm_tf/predict.py's progress bar (else a counter).
# Tests that start training processes: Bazel's "large" size, tagged slow.
SLOW_TESTS = {"train_mm_test", "pretrain_test", "train_seg_test", "distribute_test",
              "multiworker_test"}
# Files a script loads by path rather than by import.
PATH_DEPS = {"bench/graph_bench.py": {"reference_graph"}}
HEADER = [
    "# Bazel targets for mm-tf: one py_library per module, one py_binary per script, one",
    "# py_test per test file, deps from the imports. Written by `python tests/build_gen.py`;",
    "# tests/build_test.py fails when it is out of date (Bazel is not installable here).",
    "",
    'load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")',
    'load("@pypi//:requirements.bzl", "requirement")',
    "",
    'package(default_visibility = ["//visibility:public"])',
    "",
]


def _module(rel: str) -> str:
    """'mm_tf/data/pipeline.py' -> 'mm_tf.data.pipeline' (a package: its folder)."""
    parts = list(pathlib.PurePosixPath(rel).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def target_name(rel: str) -> str:
    """Target of a file: mm_tf modules by dotted path with '_', others by file stem."""
    path = pathlib.PurePosixPath(rel)
    if path.parts[0] == "mm_tf":
        return _module(rel).replace(".", "_")
    return path.stem


class _Tree:
    """The Python files of SOURCE_DIRS and where each importable name lives."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.files = sorted(str(p.relative_to(root)) for d in SOURCE_DIRS
                            for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)
        self.modules = {_module(f): f for f in self.files if f.startswith("mm_tf")}
        # Scripts import their folder-mates by bare name (sys.path holds bin/, tests/...).
        self.local = {d: {pathlib.PurePosixPath(f).stem: f for f in self.files
                          if f.startswith(d + "/")} for d in ("bin", "bench", "tests")}

    def deps(self, rel: str):
        """(local target names, external distributions) imported by file `rel`."""
        tree = ast.parse((self.root / rel).read_text())
        folder = pathlib.PurePosixPath(rel).parts[0]
        local, external = set(PATH_DEPS.get(rel, ())), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name in self.modules and self.modules[name] != rel:
                    local.add(target_name(self.modules[name]))
                elif top in EXTERNAL:
                    external.add(EXTERNAL[top])
                elif top == "flagdefs":
                    local.add("flagdefs")
                elif top in self.local.get(folder, {}):
                    local.add(top)
                elif top in ("tests", "bench") and name.count(".") >= 1:
                    sibling = name.split(".")[1]
                    if sibling in self.local[top]:
                        local.add(sibling)
                elif (top not in sys.stdlib_module_names and top != "mm_tf"
                      and top not in OPTIONAL_IMPORTS
                      and top not in self.local["bin"] and top not in self.local["tests"]
                      and top not in self.local["bench"]):
                    raise SystemExit(f"{rel}: import {name!r} is neither local, standard "
                                     "library nor in build_gen.EXTERNAL")
        local.discard(target_name(rel))
        return local, external


def _kind(tree: _Tree, rel: str) -> str:
    name = target_name(rel)
    if rel.startswith("mm_tf/"):
        return "py_library"
    if rel.startswith("bin/"):
        return "py_library" if name == "flagdefs" else "py_binary"
    if rel.startswith("bench/"):
        return "py_binary" if "__main__" in (tree.root / rel).read_text() else "py_library"
    return "py_test" if rel.endswith("_test.py") else "py_library"


def _target(tree: _Tree, rel: str) -> list:
    """The Starlark lines of one file's target."""
    name, kind = target_name(rel), _kind(tree, rel)
    local, external = tree.deps(rel)
    if rel.startswith("mm_tf/") and not rel.endswith("__init__.py"):
        package = _module(rel).rpartition(".")[0]
        if package in tree.modules:
            local.add(target_name(tree.modules[package]))
    if kind == "py_test":
        local.add("conftest")
    local.discard(name)
    lines = [f"{kind}(", f'    name = "{name}",', f'    srcs = ["{rel}"],']
    if kind in ("py_binary", "py_test"):
        lines.append(f'    main = "{rel}",')
    if kind == "py_test":
        lines.append(f'    size = "{"large" if name in SLOW_TESTS else "medium"}",')
        if name in SLOW_TESTS:
            lines.append('    tags = ["slow"],')
        text = (tree.root / rel).read_text()
        scripts = sorted(set(re.findall(r"bin/([a-z_0-9]+)\.py", text)) - {"flagdefs"})
        data = ", ".join(f'":{s}"' for s in scripts if s in tree.local["bin"])
        expr = f"[{data}]" if data else ""
        if "flags/" in text:
            expr = (expr + " + " if expr else "") + 'glob(["flags/*.flags"])'
        if expr:
            lines.append(f"    data = {expr},")
    deps = [f'        ":{d}",' for d in sorted(local)]
    deps += [f'        requirement("{e}"),' for e in sorted(external)]
    if deps:
        lines += ["    deps = [", *deps, "    ],"]
    return lines + [")", ""]


def generate(root: pathlib.Path = ROOT) -> str:
    """The BUILD text for the tree at `root`."""
    tree = _Tree(root)
    lines = list(HEADER)
    for rel in tree.files:
        lines += _target(tree, rel)
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    text = generate()
    path = ROOT / "BUILD"
    if "--check" in argv:
        if path.read_text() != text:
            print(f"{path} is out of date: run python tests/build_gen.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
