"""Course assignments: hand out a core piece of the project, let the tests grade it.

    python -m course.assign --list
        the assignments, what each teaches, its graders
    python -m course.assign OUT_DIR [NAME ...]
        a student copy with NAME's functions stubbed (default: all)
    python -m course.assign --grade SUBMISSION_DIR [NAME ...]
        run NAME's graders in a student's folder: pass / fail
    python -m course.assign --verify [NAME ...]
        re-derive the graders: stub each assignment in a scratch copy and check that exactly its
        graders fail

A student copy holds every file git tracks. In it each chosen function keeps its decorators,
signature and docstring; its body becomes `raise NotImplementedError(...)` naming the function and
the assignment, preceded by the shapes the reference solution's comments state (a hint, not the
method). The graders are the tests that fail on the stubbed copy and pass on the reference: found
by `--verify`, written down in assignments.py, rerun by `--grade`.

A function used by others fails their tests too: stubbing `fdt.FDT.forward` stops the whole model,
so that assignment's graders include training end to end. Once every handed-out function is right,
the whole suite passes again. `--grade` runs the tests as they are in the submission's folder: copy
tests/ over from the reference first if students could have edited them.
"""

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
import xml.etree.ElementTree as ET
from pathlib import Path

from course.assignments import ASSIGNMENTS

REPO = Path(__file__).resolve().parents[1]

# what a copy leaves out when the project is not a git checkout
NOT_COPIED = {".git", "runs", "data", "__pycache__", ".pytest_cache"}


# -----------------------------------------------------------------------------
# finding and stubbing a function

def find_function(tree, qualname):
    """The FunctionDef for "Class.method" or "function" among the module's top-level statements."""
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise LookupError(f"no {qualname} (no {part!r} where it should be)")
        body = node.body
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise LookupError(f"{qualname} is a class, not a function")
    return node


def docstring_node(func):
    first = func.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return first
    return None


def body_lines(func, lines):
    """(first, last) 1-based lines of the body after the docstring; first > last if there is
    none."""
    doc = docstring_node(func)
    if doc is not None:
        return doc.end_lineno + 1, func.end_lineno
    first = func.body[0].lineno
    if first == func.lineno:
        raise ValueError(f"{func.name}: the body shares the def line; put it on its own lines")
    # comments opening the body
    while first - 1 > func.lineno and lines[first - 2].strip().startswith("#"):
        first -= 1
    return first, func.end_lineno


SHAPE = re.compile(r"#\s*(\([^()]*,[^()]*\))")   # a trailing "# (B, T, n_tokens) ..." comment


def shape_hints(source, func, first, last):
    """"name (shape)" for every assignment in lines first..last whose trailing comment opens with a
    shape, and "returns (shape)" for a return: the reference's shape comments, without its
    method."""
    comments = {tok.start[0]: tok.string
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT and first <= tok.start[0] <= last}
    hints, named = [], set()
    for node in ast.walk(func):
        if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return)):
            continue
        match = SHAPE.match(comments.get(node.end_lineno, ""))
        if match is None:
            continue
        if isinstance(node, ast.Return):
            hints.append((node.lineno, f"returns {match.group(1)}"))
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        name = ", ".join(ast.unparse(t).strip("()") for t in targets)
        # a name's first shape; later ones may be a step's detail
        if name not in named:
            named.add(name)
            hints.append((node.lineno, f"{name} {match.group(1)}"))
    return [text for _, text in sorted(hints)]


def stub_message(module, qualname, assignment):
    return f"{module}.{qualname}: {assignment} — see the docstring"


def stub_function(source, qualname, assignment, module):
    """source with qualname's body (after its docstring) replaced by shape hints and a raise."""
    lines = source.splitlines(keepends=True)
    func = find_function(ast.parse(source), qualname)
    first, last = body_lines(func, lines)
    indent = " " * func.body[0].col_offset
    hints = shape_hints(source, func, first, last)
    stub = []
    if hints:
        stub.append(f"{indent}# shapes in the reference solution:\n")
        stub += [f"{indent}#   {h}\n" for h in hints]
    stub.append(f"{indent}raise NotImplementedError("
                f"{stub_message(module, qualname, assignment)!r})\n")
    return "".join(lines[:first - 1] + stub + lines[last:])


def is_stub(source, qualname):
    """True when qualname's body is one of our stubs (a student copy, not the reference)."""
    func = find_function(ast.parse(source), qualname)
    body = func.body[1:] if docstring_node(func) else func.body
    return (len(body) == 1 and isinstance(body[0], ast.Raise) and isinstance(body[0].exc, ast.Call)
            and getattr(body[0].exc.func, "id", None) == "NotImplementedError")


def split_target(target):
    """"fdt.py:FDT.forward" -> ("fdt.py", "fdt", "FDT.forward")."""
    file, qualname = target.split(":")
    return file, Path(file).with_suffix("").as_posix().replace("/", "."), qualname


# -----------------------------------------------------------------------------
# student copies

def project_files(root):
    """Every file git tracks (as it is in the working tree), or, outside git, everything but
    NOT_COPIED."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True,
                             check=True).stdout
        return [Path(p) for p in out.split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p.relative_to(root) for p in sorted(root.rglob("*"))
                if p.is_file() and not NOT_COPIED & set(p.relative_to(root).parts)]


def write_copy(out, names, root=REPO):
    """Copy the project into out (new or empty) and stub every function of the named assignments."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; give a new or empty folder")
    for rel in project_files(root):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)
    for name in names:
        for target in ASSIGNMENTS[name]["functions"]:
            file, module, qualname = split_target(target)
            path = out / file
            path.write_text(stub_function(path.read_text(), qualname, name, module))
    return out


# -----------------------------------------------------------------------------
# running tests and reading their outcomes

def run_pytest(folder, selectors):
    """{node id: (outcome, message)} for the tests `selectors` pick in folder; outcome is "passed",
    "failed" (a failure or an error) or "skipped", message the first line of what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}", *selectors],
                       cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not report.exists():
            return {}
        outcomes = {}
        for case in ET.parse(report).iter("testcase"):
            node_id = junit_node_id(folder, case.get("classname", ""), case.get("name", ""))
            bad = [child for child in case if child.tag in ("failure", "error")]
            if bad:
                outcome = ("failed", (bad[0].get("message") or "").split("\n")[0])
            else:
                outcome = ("skipped" if case.find("skipped") is not None else "passed", "")
            if outcomes.get(node_id, ("",))[0] != "failed":   # a teardown error adds a second entry
                outcomes[node_id] = outcome
        return outcomes


def junit_node_id(folder, classname, name):
    """junit's ("tests.test_fdt", "test_x[3]") -> "tests/test_fdt.py::test_x[3]"; a collection error
    ("", "tests.test_fdt") -> "tests/test_fdt.py"."""
    parts = classname.split(".") if classname else name.split(".")
    for i in range(len(parts), 0, -1):                  # the longest prefix that is a file
        file = "/".join(parts[:i]) + ".py"
        if (Path(folder) / file).is_file():
            return "::".join([file, *parts[i:]] + ([name] if classname else []))
    return f"{classname}::{name}"


def covers(grader, node_id):
    """Does a grader id select this test? A file or an id without [params] covers what is under it,
    and a failure of a whole file (a collection error) covers every grader in it."""
    return (node_id == grader or node_id.startswith((grader + "[", grader + "::"))
            or grader.startswith(node_id + "::"))


def grade(folder, names):
    """Run the named assignments' graders in folder in one pytest run; print and return pass /
    fail."""
    selectors = sorted({g for name in names for g in ASSIGNMENTS[name]["graders"]})
    outcomes = run_pytest(folder, selectors)
    passed_all = True
    for name in names:
        mine = {n: o for n, o in outcomes.items()
                if any(covers(g, n) for g in ASSIGNMENTS[name]["graders"])}
        failed = sorted(n for n, (o, _) in mine.items() if o == "failed")
        ok = bool(mine) and not failed
        passed_all &= ok
        ran = sum(o == "passed" for o, _ in mine.values())
        print(f"{'PASS' if ok else 'FAIL'}  {name:<22} {ran} passed, {len(failed)} failed"
              + ("" if mine else " (no grading test ran)"))
        for n in failed:
            print(f"        {n}: {mine[n][1][:120]}")
    return passed_all


# -----------------------------------------------------------------------------
# re-deriving the graders

def local_imports(path, modules):
    """The project modules (dotted names, e.g. "lib.metrics") a file imports at its top level (a
    test's fixtures reach the rest through them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lib import metrics` imports the module lib.metrics; `from lib.metrics import f`
            # the module lib.metrics
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found & modules


def tests_reaching(root, module):
    """The test files whose imports reach `module`: only they can fail when it is stubbed."""
    files = [p for p in root.glob("*.py")] + [p for d in ("lib", "tools", "course")
                                              for p in (root / d).glob("*.py")]
    paths = {p.relative_to(root).with_suffix("").as_posix().replace("/", "."): p for p in files
             if p.name != "__init__.py"}
    graph = {m: local_imports(p, set(paths)) for m, p in paths.items()}

    def reaches(m, seen=()):
        return m == module or any(reaches(n, seen + (m,)) for n in graph[m] if n not in seen)
    return sorted(f"tests/{t.name}" for t in (root / "tests").glob("test_*.py")
                  if any(reaches(m) for m in local_imports(t, set(paths))))


def summarise(failed, all_ids):
    """The shortest list of grader ids: a test function when all its parameter sets failed."""
    by_function = {}
    for n in all_ids:
        by_function.setdefault(n.split("[")[0], []).append(n)
    out = []
    for function, ids in sorted(by_function.items()):
        hit = [n for n in ids if n in failed]
        out += [function] if hit and len(hit) == len(ids) else hit
    return out


def verify(names):
    """For each assignment: the tests that fail once it is stubbed (and pass on the reference) must
    be exactly those its graders select. Prints the list to paste when they differ."""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        reference = write_copy(Path(tmp) / "reference", [])
        files = sorted({f for name in names for t in ASSIGNMENTS[name]["functions"]
                        for f in tests_reaching(reference, split_target(t)[1])})
        print(f"reference: running {' '.join(files)}", flush=True)
        base = run_pytest(reference, files)
        broken = sorted(n for n, (o, _) in base.items() if o == "failed")
        if broken:
            print("the reference fails these (left out of every comparison):\n  "
                  + "\n  ".join(broken))
        for name in names:
            copy = write_copy(Path(tmp) / name, [name])
            mine = sorted({f for t in ASSIGNMENTS[name]["functions"]
                           for f in tests_reaching(copy, split_target(t)[1])})
            outcomes = run_pytest(copy, mine)
            failed = {n for n, (o, _) in outcomes.items()
                      if o == "failed" and base.get(n, ("",))[0] == "passed"}
            listed = {n for n, (o, _) in base.items()
                      if o == "passed" and any(covers(g, n) for g in ASSIGNMENTS[name]["graders"])}
            good = failed == listed
            ok &= good
            print(f"{'ok  ' if good else 'DIFF'}  {name}: {len(failed)} tests fail when stubbed, "
                  f"{len(listed)} listed", flush=True)
            if not good:
                print(f"        not listed: {sorted(failed - listed)}\n"
                      f"        listed, passing: {sorted(listed - failed)}")
                print("        graders=" + repr(summarise(failed, sorted(base))))
    return ok


# -----------------------------------------------------------------------------
# command line

def print_list():
    for name, a in ASSIGNMENTS.items():
        print(f"{name}  (~{a['minutes']} min)\n    {a['teaches']}")
        print(f"    stubs:   {', '.join(a['functions'])}")
        per_file = {}
        for g in a["graders"]:
            file = g.split("::")[0].removeprefix("tests/")
            per_file[file] = per_file.get(file, 0) + 1
        print(f"    graders: {len(a['graders'])} test ids, in "
              + ", ".join(f"{f} ({n})" for f, n in per_file.items()))


def print_graders(names):
    for name in names:
        print(f"{name} is graded by:\n    " + "\n    ".join(ASSIGNMENTS[name]["graders"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?",
                   help="where to write the student copy (with --grade: the submission)")
    p.add_argument("names", nargs="*", metavar="NAME", help="assignments (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the assignments")
    mode.add_argument("--grade", action="store_true",
                      help="run the graders in FOLDER, a student's copy")
    mode.add_argument("--verify", action="store_true",
                      help="check every grader list against stubbed copies")
    args = p.parse_args(argv)
    if args.verify and args.folder:                      # --verify takes names only
        args.names.insert(0, args.folder)
    names = args.names or list(ASSIGNMENTS)
    unknown = [n for n in names if n not in ASSIGNMENTS]
    if unknown:
        p.error(f"unknown assignment(s) {', '.join(unknown)}; "
                "python -m course.assign --list shows them")
    if args.list:
        print_list()
    elif args.verify:
        return 0 if verify(names) else 1
    elif not args.folder:
        p.error("give OUT_DIR (or --list, --grade SUBMISSION_DIR, --verify)")
    elif args.grade:
        return 0 if grade(Path(args.folder), names) else 1
    else:
        out = write_copy(args.folder, names)
        print(f"wrote a student copy to {out} with {len(names)} assignment(s) stubbed")
        print_graders(names)
        print((f"grade it with: python -m course.assign --grade {out} "
               f"{' '.join(args.names)}").rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
