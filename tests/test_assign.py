"""assign.py: every assignment's stub keeps the function's face (signature, decorators, docstring)
and nothing else changes; the graders exist; and in a student copy the graders fail naming the
function while the other tests pass. Skipped inside a student copy, where the stubs are already in
place."""

import ast
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from course import assign

REPO = Path(__file__).resolve().parents[1]


def stubbed_here():
    """The targets already stubbed in this checkout (a student copy has some)."""
    out = []
    for a in assign.ASSIGNMENTS.values():
        for target in a["functions"]:
            file, _, qualname = assign.split_target(target)
            try:
                out += [target] if assign.is_stub((REPO / file).read_text(), qualname) else []
            except LookupError:
                pass                                    # test_every_target_exists reports it
    return out


pytestmark = pytest.mark.skipif(bool(stubbed_here()),
                                reason="a student copy: assign.py grades it, not this file")


def without_bodies(source, qualnames):
    """The module's AST with the named functions' bodies cut to their docstrings: what a stub
    keeps."""
    tree = ast.parse(source)
    for qualname in qualnames:
        func = assign.find_function(tree, qualname)
        func.body = func.body[:1] if assign.docstring_node(func) else []
    return ast.dump(tree)


def test_every_target_exists_and_every_grader_names_a_test():
    for name, a in assign.ASSIGNMENTS.items():
        assert a["teaches"] and a["minutes"] > 0 and a["graders"], name
        for target in a["functions"]:
            file, _, qualname = assign.split_target(target)
            # LookupError if gone
            assign.find_function(ast.parse((REPO / file).read_text()), qualname)
        for grader in a["graders"]:
            file, _, test = grader.partition("::")
            defined = {n.name for n in ast.parse((REPO / file).read_text()).body
                       if isinstance(n, ast.FunctionDef)}
            assert test.split("[")[0] in defined, f"{name}: {grader} is not a test"


def test_stubs_keep_signature_decorators_docstring_and_nothing_else_changes(tmp_path):
    out = assign.write_copy(tmp_path / "student", list(assign.ASSIGNMENTS))
    by_file = {}
    for name, a in assign.ASSIGNMENTS.items():
        for target in a["functions"]:
            file, module, qualname = assign.split_target(target)
            by_file.setdefault(file, []).append(qualname)
            ref_source, stub_source = (REPO / file).read_text(), (out / file).read_text()
            ref = assign.find_function(ast.parse(ref_source), qualname)
            stub = assign.find_function(ast.parse(stub_source), qualname)
            assert assign.is_stub(stub_source, qualname), target
            assert ast.get_docstring(stub) == ast.get_docstring(ref), target
            assert ast.dump(stub.args) == ast.dump(ref.args), target
            assert ([ast.dump(d) for d in stub.decorator_list]
                    == [ast.dump(d) for d in ref.decorator_list]), target
            assert (assign.stub_message(module, qualname, name)
                    in ast.get_source_segment(stub_source, stub))
    for file, qualnames in by_file.items():
        py_compile.compile(str(out / file), doraise=True)
        assert (without_bodies((out / file).read_text(), qualnames)
                == without_bodies((REPO / file).read_text(), qualnames))
    # the other files: copied as they are
    for rel in assign.project_files(REPO):
        if rel.as_posix() not in by_file:
            assert (out / rel).read_bytes() == (REPO / rel).read_bytes(), rel


def test_stub_of_a_method_without_docstring_keeps_indentation():
    source = ("class A:\n    @staticmethod\n    def f(x):\n        # (B, T) comment only\n"
              "        y = x + 1  # (B, T)\n        return y\n\n"
              "    def g(self):\n        return 2\n")
    stubbed = assign.stub_function(source, "A.f", "demo", "m")
    namespace = {}
    exec(stubbed, namespace)
    with pytest.raises(NotImplementedError, match=r"m\.A\.f: demo"):
        namespace["A"].f(1)
    assert namespace["A"]().g() == 2 and "#   y (B, T)" in stubbed and "comment only" not in stubbed
    with pytest.raises(LookupError):
        assign.stub_function(source, "A.h", "demo", "m")


def test_student_copy_fails_exactly_the_graders_naming_the_function(tmp_path):
    names = ["lr-schedule", "contrastive-loss"]
    out = tmp_path / "student"
    cli = subprocess.run([sys.executable, "-m", "course.assign", str(out), *names], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert all(g in cli.stdout for n in names for g in assign.ASSIGNMENTS[n]["graders"])
    # the cheap part of the graders (training end to end is left to --verify), and the rest of
    # test_model.py
    cheap = ("tests/test_model.py", "tests/test_graders.py",
             "tests/test_train.py::test_lr_schedule")
    graders = {g: n for n in names for g in assign.ASSIGNMENTS[n]["graders"] if g.startswith(cheap)}
    outcomes = assign.run_pytest(out, ["tests/test_model.py", *graders, "-k", "not base"])
    assert len(outcomes) > len(graders)
    for node, (outcome, message) in outcomes.items():
        owners = {n for g, n in graders.items() if assign.covers(g, node)}
        if owners:
            stubs = [assign.stub_message(*assign.split_target(t)[1:], n)
                     for n in owners for t in assign.ASSIGNMENTS[n]["functions"]]
            assert outcome == "failed" and "NotImplementedError" in message, (node, message)
            assert any(stub in message for stub in stubs), (node, message)
        else:
            assert outcome == "passed", (node, message)
