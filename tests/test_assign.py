"""assign.py: a stub keeps the function's face and a student copy holds no answer; grading passes
the reference and fails an untouched stub of every assignment; only the submitted functions count;
a grade has a time limit and leaves no process behind; a bad argument is one line. Skipped inside
a student copy, where the stubs are already in place."""

import ast
import json
import os
import py_compile
import signal
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import pytest

from course import assign, functions, grading

REPO = Path(__file__).resolve().parents[1]


def stubbed_here():
    """The targets already stubbed in this checkout (a student copy has some)."""
    out = []
    for a in assign.ASSIGNMENTS.values():
        for target in a["functions"]:
            file, _, qualname = functions.split_target(target)
            try:
                out += [target] if functions.is_stub((REPO / file).read_text(), qualname) else []
            except LookupError:
                pass                                    # test_every_function_and_grader_exists
    return out


pytestmark = pytest.mark.skipif(bool(stubbed_here()),
                                reason="a student copy: assign.py grades it, not this file")


def without_bodies(source, qualnames):
    """The module's AST with the named functions' bodies cut to their docstrings: what a stub
    keeps."""
    tree = ast.parse(source)
    for qualname in qualnames:
        func = functions.find_function(tree, qualname)
        func.body = func.body[:1] if functions.docstring_node(func) else []
    return ast.dump(tree)


@pytest.fixture
def first_graders(monkeypatch):
    """Every assignment graded by its first grader alone, a quick test of the function itself:
    enough to see grading pass or fail, where every grader also runs in this suite as a test."""
    for name, a in assign.ASSIGNMENTS.items():
        monkeypatch.setitem(assign.ASSIGNMENTS, name, {**a, "graders": a["graders"][:1]})


def summary(out, names):
    """The last lines of a grading's output, one per assignment: [(PASS or FAIL, name, rest)]."""
    return [tuple(line.split(None, 2)) for line in out.splitlines()[-len(names):]]


def failures(out, names):
    """{assignment: its FAILED lines} from a grading's output."""
    found, section = {n: [] for n in names}, None
    for line in out.splitlines():
        if line.endswith(":") and line[:-1] in names:
            section = line[:-1]
        elif line.startswith("    FAILED ") and section:
            found[section].append(line)
    return found


def with_body(root, target, body):
    """Give target's function in the copy at root the lines `body`."""
    functions.edit(root, target, lambda source, qualname, module: functions.replace_body(
        source, qualname, lambda *_: body))


def alive(pid):
    """Whether pid is a process that runs (a zombie waits only to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# -----------------------------------------------------------------------------
# the lists, the stubs, the student copy


def test_every_function_and_grader_exists():
    graders = {g for a in assign.ASSIGNMENTS.values() for g in a["graders"]}
    # by name, in whatever test file holds it
    missing = graders - grading.defining_files(REPO, graders).keys()
    assert not missing, f"graders that no test file defines: {sorted(missing)}"
    for name, a in assign.ASSIGNMENTS.items():
        assert a["teaches"] and a["minutes"] > 0 and a["seconds"] > 0 and a["graders"], name
        assert len(set(a["graders"])) == len(a["graders"]), name
        for target in a["functions"] + a.get("copy_plain", []) + a.get("copy_hidden", []):
            file, _, qualname = functions.split_target(target)
            # LookupError if gone
            functions.find_function(ast.parse((REPO / file).read_text()), qualname)


def test_list_names_each_assignment_first_on_its_own_line(capsys):
    assert assign.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == list(assign.ASSIGNMENTS)


def test_stubs_keep_signature_decorators_docstring_and_nothing_else_changes(tmp_path):
    out = assign.write_copy(tmp_path / "student", list(assign.ASSIGNMENTS))
    by_file = {}
    for name, a in assign.ASSIGNMENTS.items():
        for target in a["functions"]:
            file, module, qualname = functions.split_target(target)
            by_file.setdefault(file, []).append(qualname)
            ref_source, stub_source = (REPO / file).read_text(), (out / file).read_text()
            ref = functions.find_function(ast.parse(ref_source), qualname)
            stub = functions.find_function(ast.parse(stub_source), qualname)
            assert functions.is_stub(stub_source, qualname), target
            assert ast.get_docstring(stub) == ast.get_docstring(ref), target
            assert ast.dump(stub.args) == ast.dump(ref.args), target
            assert ([ast.dump(d) for d in stub.decorator_list]
                    == [ast.dump(d) for d in ref.decorator_list]), target
            assert (functions.stub_message(module, qualname, name)
                    in ast.get_source_segment(stub_source, stub))
    for file, qualnames in by_file.items():
        py_compile.compile(str(out / file), doraise=True)
        assert (without_bodies((out / file).read_text(), qualnames)
                == without_bodies((REPO / file).read_text(), qualnames))
    # the other files, but those of the fast kernels that would give an answer away: as they are
    kernels = {functions.split_target(t)[0] for a in assign.ASSIGNMENTS.values()
               for t in a.get("copy_plain", []) + a.get("copy_hidden", [])}
    for rel in functions.project_files(REPO):
        if rel.as_posix() not in by_file.keys() | kernels:
            assert (out / rel).read_bytes() == (REPO / rel).read_bytes(), rel


def test_a_student_copy_holds_no_answer_and_trains_what_it_hands_out(tmp_path):
    out = assign.write_copy(tmp_path / "student", list(assign.ASSIGNMENTS))
    # the pooling's -inf fill and the loss's cross-entropy appear in no code of the copy
    answers = {"masked_fill", "masked_fill_", "log_softmax", "cross_entropy"}
    for path in out.rglob("*.py"):
        with open(path) as f:
            names = {t.string for t in tokenize.generate_tokens(f.readline)
                     if t.type == tokenize.NAME}
        assert not names & answers, (path, names & answers)
    # the fast layer trains the student's pooling and activation; the pooling kernel is left out
    fast = (out / "lib" / "fdt_fast.py").read_text()
    tree = ast.parse(fast)
    for qualname, call in (("FDT.pooled_relevance", "super().pooled_relevance(queries, mask)"),
                           ("FDT.activate", "super().activate(s)")):
        assert ast.unparse(functions.find_function(tree, qualname).body[-1]) == f"return {call}"
    assert functions.is_stub(fast, "MaxPooledRelevance.forward")


def test_stub_of_a_method_without_docstring_keeps_indentation():
    source = ("class A:\n    @staticmethod\n    def f(x):\n        # (B, L) comment only\n"
              "        y = x + 1  # (B, L)\n        return y\n\n"
              "    def g(self):\n        return 2\n")
    stubbed = functions.stub_function(source, "A.f", "demo", "m")
    namespace = {}
    exec(stubbed, namespace)
    with pytest.raises(NotImplementedError, match=r"m\.A\.f: demo"):
        namespace["A"].f(1)
    assert namespace["A"]().g() == 2 and "#   y (B, L)" in stubbed and "comment only" not in stubbed
    with pytest.raises(LookupError):
        functions.stub_function(source, "A.h", "demo", "m")


def test_a_function_is_taken_whatever_its_indentation():
    source = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        return 2\n"
    # the student's method, indented by 2
    mine = ["  @staticmethod\n", "  def f():\n", "      return 3\n"]
    merged = functions.replace_function(source, "A.f", mine, 2)
    namespace = {}
    exec(merged, namespace)
    assert namespace["A"].f() == 3 and namespace["A"]().g() == 2


# -----------------------------------------------------------------------------
# grading


def test_grading_passes_the_reference_and_fails_an_untouched_stub_of_every_assignment(
        first_graders, tmp_path, capsys, monkeypatch):
    """What CI checks of the course: grading the reference PASSes and grading an untouched student
    copy FAILs, for every assignment, each failure under the assignment whose stub raised it. The
    lists also name a test that no longer exists: grading says so, and does not fail for it."""
    names = list(assign.ASSIGNMENTS)
    lr = assign.ASSIGNMENTS["lr-schedule"]
    monkeypatch.setitem(assign.ASSIGNMENTS, "lr-schedule",
                        {**lr, "graders": lr["graders"] + ["test_renamed_long_ago"]})
    assert grading.grade(REPO, names)
    out = capsys.readouterr().out
    assert [line[:2] for line in summary(out, names)] == [("PASS", n) for n in names]
    assert "stale grader list: test_renamed_long_ago is defined by no test file" in out

    student = assign.write_copy(tmp_path / "student", names)
    assert not grading.grade(student, names)
    out = capsys.readouterr().out
    assert [line[:2] for line in summary(out, names)] == [("FAIL", n) for n in names]
    for name, lines in failures(out, names).items():
        own = [functions.stub_message(*functions.split_target(t)[1:], name)
               for t in assign.ASSIGNMENTS[name]["functions"]]
        assert lines and all(any(stub in line for stub in own) for line in lines), (name, lines)


PASS_EVERYTHING = '''import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome, report.longrepr = "passed", None
'''


def test_only_the_submitted_functions_count(first_graders, tmp_path, capsys):
    """A submission's own conftest.py, tests, pytest configuration and plugins change nothing, so a
    stub still FAILs; and an assignment is graded with the reference's functions for the others,
    so a right backward PASSes while the threshold it is used with is still a stub."""
    names = ["sparsemax-threshold", "sparsemax-backward"]
    student = assign.write_copy(tmp_path / "student", names)
    source = (REPO / "fdt.py").read_text()
    func = functions.find_function(ast.parse(source), "SparsemaxFunction.backward")
    first, last = functions.body_lines(func, source.splitlines())
    indent = func.body[0].col_offset
    with_body(student, "fdt.py:SparsemaxFunction.backward", ["# written in class"] + [
        line[indent:] for line in source.splitlines()[first - 1:last]])
    # a plugin that turns every test into a pass, loaded every way pytest allows
    for conftest in ("conftest.py", "tests/conftest.py", "rigged.py"):
        (student / conftest).write_text(PASS_EVERYTHING)
    (student / "pytest.ini").write_text("[pytest]\naddopts = -p rigged\n")
    (student / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-p rigged"\n')
    (student / "setup.cfg").write_text("[tool:pytest]\naddopts = -p rigged\n")
    (student / "tox.ini").write_text("[pytest]\naddopts = -p rigged\n")
    # the graders, rewritten to pass, or to be skipped
    graders = [g for n in names for g in assign.ASSIGNMENTS[n]["graders"]]
    for test, files in grading.defining_files(student, graders).items():
        for file in files:
            (student / file).write_text(f"import pytest\npytestmark = pytest.mark.skip\n\n\n"
                                        f"def {test}():\n    pass\n")
    assert not grading.grade(student, names)
    out = capsys.readouterr().out
    assert [line[:2] for line in summary(out, names)] == [("FAIL", names[0]), ("PASS", names[1])]
    assert "NotImplementedError: fdt.threshold_sort" in failures(out, names)[names[0]][0]


def test_a_grade_that_never_ends_is_stopped_with_every_process_it_started(
        first_graders, tmp_path, capsys):
    student = assign.write_copy(tmp_path / "student", ["lr-schedule"])
    pids = tmp_path / "pids"
    # a child in a session of its own (as torchrun's workers), then a loop that never returns
    with_body(student, "train.py:lr_at", [
        "import subprocess, sys",
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],",
        "                         start_new_session=True)",
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')",
        "while True:",
        "    pass"])
    start = time.monotonic()
    assert not grading.grade(student, ["lr-schedule"], timeout=10)
    assert time.monotonic() - start < 60
    (verdict, name, rest), = summary(capsys.readouterr().out, ["lr-schedule"])
    assert verdict == "FAIL" and rest.startswith("(timed out after 10 s in tests/"), rest
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and not any(alive(p) for p in started)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["ctrl-c", "kill", "hang-up"])
def test_stopping_the_grader_stops_every_process_it_started(stop, tmp_path):
    student = assign.write_copy(tmp_path / "student", ["lr-schedule"])
    pids = tmp_path / "pids"
    with_body(student, "train.py:lr_at", [
        f"open({str(pids)!r}, 'w').write(str(os.getpid()))",
        "while True:",
        "    pass"])
    # the first grader alone, as a Ctrl-C or a kill would find it
    script = ("import sys\nfrom course import assign\n"
              "a = assign.ASSIGNMENTS['lr-schedule']\na['graders'] = a['graders'][:1]\n"
              f"sys.exit(assign.main(['--grade', {str(student)!r}, 'lr-schedule']))\n")
    # Ctrl-C's default, as at a terminal: a job a shell starts in the background ignores SIGINT,
    # and so would a grader started from a test run in one
    grader = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not pids.exists() and grader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pids.exists(), grader.communicate()
        time.sleep(0.2)                                 # the pid is written before the loop
        grader.send_signal(stop)
        _, err = grader.communicate(timeout=60)
        assert grader.returncode == (130 if stop == signal.SIGINT else 128 + stop), err
        assert not alive(int(pids.read_text()))
    finally:                                            # nothing left spinning when it fails
        grader.kill()
        grader.wait()
        if pids.exists() and alive(int(pids.read_text())):
            os.kill(int(pids.read_text()), signal.SIGKILL)


def test_a_submission_without_its_function_fails_saying_what_is_missing(tmp_path, capsys):
    names = ["sparsemax-backward", "contrastive-loss", "lr-schedule"]
    student = assign.write_copy(tmp_path / "student", names)
    (student / "fdt.py").write_text("import torch\n")
    (student / "model.py").unlink()
    (student / "train.py").write_text("def lr_at(step:\n")
    assert not grading.grade(student, names)
    assert summary(capsys.readouterr().out, names) == [
        ("FAIL", names[0], "(fdt.py: no SparsemaxFunction.backward (no 'SparsemaxFunction' where "
                           "it should be))"),
        ("FAIL", names[1], "(the submission has no model.py)"),
        ("FAIL", names[2], "(train.py does not parse at line 1: '(' was never closed)")]


def judged(tmp_path, events, graders=("test_a", "test_b"), finished=True):
    """judge() of an assignment with these graders on a run that logged these events."""
    log = tmp_path / "events.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    run = grading.Run(log, tmp_path / "no-output", finished, False, 1.0)
    assign.ASSIGNMENTS["demo"] = {"graders": list(graders)}
    try:
        return grading.judge("demo", run, {"test_a": ["tests/test_x.py"]})
    finally:
        del assign.ASSIGNMENTS["demo"]


def report(test, outcome, when="call", message=""):
    return {"nodeid": f"tests/test_x.py::{test}", "name": test.split("[")[0], "when": when,
            "outcome": outcome, "message": message}


def test_a_pass_needs_a_grader_that_passed_and_none_that_failed(tmp_path):
    collected = {"collected": ["test_a", "test_b"]}
    ok, text, details = judged(tmp_path, [collected, report("test_a[1]", "passed"),
                                          report("test_a[2]", "passed"),
                                          report("test_b", "passed")])
    assert ok and text.startswith("3 passed, 0 failed") and not details
    # every grader skipped
    ok, text, _ = judged(tmp_path, [collected, report("test_a", "skipped", "setup"),
                                    report("test_b", "skipped", "setup")])
    assert not ok and text.endswith("(no grading test passed)") and "2 skipped" in text
    # an error in a fixture's teardown fails a test that passed
    ok, text, details = judged(tmp_path, [
        collected, report("test_a", "passed"), report("test_b", "passed"),
        report("test_b", "failed", "teardown", "OSError: left a file open")])
    assert not ok and details == ["    FAILED tests/test_x.py::test_b: OSError: left a file open"]
    # a test module that does not import
    ok, _, details = judged(tmp_path, [{"collect_error": "tests/test_x.py",
                                        "message": "NameError: name 'torch' is not defined"}])
    assert not ok and details == [
        "    could not collect tests/test_x.py: NameError: name 'torch' is not defined"]
    # a grader no longer collected is named, and the student is not failed for it
    ok, _, details = judged(tmp_path, [{"collected": ["test_b"]}, report("test_b", "passed")])
    assert ok and len(details) == 1 and "stale grader list: test_a is not collected" in details[0]
    # a run that stopped before its end (a test killed pytest) in test_b: test_b has no outcome
    ok, text, _ = judged(tmp_path, [collected, report("test_a", "passed"),
                                    report("test_b", "passed", "setup")], finished=False)
    assert not ok and text.startswith("(the test run stopped") and "1 passed, 0 failed" in text


# -----------------------------------------------------------------------------
# the command line


def test_a_bad_argument_is_one_error_line(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "kept.py").write_text("")
    cases = {"no such folder": ["--grade", str(tmp_path / "missing"), "lr-schedule"],
             "is not a folder": ["--grade", str(a_file), "lr-schedule"],
             "is a file": [str(a_file), "lr-schedule"],
             "is not empty": [str(full), "lr-schedule"],
             "cannot be made there": [str(a_file / "copy"), "lr-schedule"],
             "unknown assignment(s) lr-schedual": ["--grade", str(full), "lr-schedual"],
             "not a positive number": ["--grade", str(full), "--timeout", "0"]}
    for says, argv in cases.items():
        with pytest.raises(SystemExit) as stop:
            assign.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2, says
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and says in errors[0] and "Traceback" not in err, (says, err)
    assert list(full.iterdir()) == [full / "kept.py"] and a_file.read_text() == "x"
