"""Course assignments: hand out a core piece of the project, let the tests grade it.

    python -m course.assign --list
        the assignments, what each teaches, its graders, how long grading takes
    python -m course.assign OUT_DIR [NAME ...]
        a student copy with NAME's functions stubbed (default: all)
    python -m course.assign --grade SUBMISSION_DIR [NAME ...] [--timeout SECONDS]
        grade NAME's functions in a student's folder: a PASS or FAIL line for each
    python -m course.assign --verify [NAME ...]
        re-derive the graders: stub each assignment in a scratch copy and check that exactly its
        graders fail

A student copy holds every file git tracks. In it each chosen function keeps its decorators,
signature and docstring (which states what the graders check); its body becomes
`raise NotImplementedError(...)` naming the function and the assignment, preceded by the shapes
the reference solution's comments state (a hint, not the method). The graders are the tests that
fail on the stubbed copy and pass on the reference, named in assignments.py.

Grading (grading.py) takes only those functions from a submission, one assignment at a time, into
a fresh copy of this project, and runs this project's tests there with a time limit.
course/README.md is the instructors' guide: what grading trusts, and how long it takes.
"""

import argparse
import ast
import signal
import sys
import tempfile
import time
from pathlib import Path

from course.assignments import ASSIGNMENTS
from course.functions import REPO, copy_project, edit, replace_body, split_target, \
    stub_function
from course.grading import LIMIT_FACTOR, MIN_LIMIT_S, grade, run_tests


# -----------------------------------------------------------------------------
# student copies

def stub_functions(root, names):
    """Stub every function of the named assignments in the copy at root."""
    for name in names:
        for target in ASSIGNMENTS[name]["functions"]:
            edit(root, target, lambda source, qualname, module: stub_function(
                source, qualname, name, module))


def call_overridden(func, first, last):
    """The body of a method that calls the method it overrides with its own arguments."""
    args = func.args
    if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
        raise ValueError(f"{func.name}: only plain positional arguments can be passed on")
    return [f"return super().{func.name}({', '.join(a.arg for a in args.args[1:])})"]


def write_copy(out, names, root=REPO):
    """A student copy in out (new or empty): the named assignments' functions stubbed, and the
    fast kernels that would give their answers away running the plain code or left out."""
    out = copy_project(Path(out), root)
    stub_functions(out, names)
    for name in names:
        for target in ASSIGNMENTS[name].get("copy_plain", []):
            edit(out, target, lambda source, qualname, module: replace_body(
                source, qualname, call_overridden))
        for target in ASSIGNMENTS[name].get("copy_hidden", []):
            message = (f"{split_target(target)[1]}.{split_target(target)[2]}: left out of this "
                       f"copy, as it computes the answer to {name}; grading runs its tests with "
                       "the instructor's")
            edit(out, target, lambda source, qualname, module: replace_body(
                source, qualname, lambda *_: [f"raise NotImplementedError({message!r})"]))
    return out


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
    return sorted(t.relative_to(root).as_posix() for t in (root / "tests").rglob("test_*.py")
                  if any(reaches(m) for m in local_imports(t, set(paths))))


def verify(names):
    """For each assignment: the tests that fail once it is stubbed (and pass on the reference) must
    be exactly those its graders name. Prints the differences."""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        reference = copy_project(Path(tmp) / "reference" / "project")
        files = sorted({f for name in names for t in ASSIGNMENTS[name]["functions"]
                        for f in tests_reaching(reference, split_target(t)[1])})
        print(f"reference: running {' '.join(files)}", flush=True)
        base = run_tests(reference, reference.parent, files)
        broken = sorted(node for node, (_, o, _) in base.outcomes.items() if o == "failed")
        if broken:
            print("the reference fails these (left out of every comparison):\n  "
                  + "\n  ".join(broken))
        for name in names:
            copy = copy_project(Path(tmp) / name / "project")
            stub_functions(copy, [name])
            mine = sorted({f for t in ASSIGNMENTS[name]["functions"]
                           for f in tests_reaching(copy, split_target(t)[1])})
            start = time.monotonic()
            run = run_tests(copy, copy.parent, mine)
            failed = {test for node, (test, o, _) in run.outcomes.items()
                      if o == "failed" and base.outcomes.get(node, ("", ""))[1] == "passed"}
            listed = set(ASSIGNMENTS[name]["graders"])
            good = failed == listed
            ok &= good
            print(f"{'ok  ' if good else 'DIFF'}  {name}: {len(failed)} tests fail when stubbed, "
                  f"{len(listed)} listed ({time.monotonic() - start:.0f} s)", flush=True)
            if not good:
                print(f"        not listed: {sorted(failed - listed)}\n"
                      f"        listed, passing: {sorted(listed - failed)}")
    return ok


# -----------------------------------------------------------------------------
# command line

def print_list():
    for name, a in ASSIGNMENTS.items():
        print(name)
        print(f"    {a['teaches']}")
        print(f"    ~{a['minutes']} min for a student; grading the reference takes "
              f"~{a['seconds']} s on 2 CPU cores")
        print(f"    stubs:   {', '.join(a['functions'])}")
        print(f"    graders: {len(a['graders'])} tests, {', '.join(a['graders'][:3])}, ...")


def positive_seconds(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def check_output_folder(p, out):
    """The hand-out's folder: new, or an empty folder."""
    if out.exists() and not out.is_dir():
        p.error(f"{out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        p.error(f"{out} is not empty; give a new or empty folder")
    parent = next(q for q in out.absolute().parents if q.exists())
    if not parent.is_dir():
        p.error(f"{parent} is a file; {out} cannot be made there")


def stop_on_signal(signum, frame):
    # SystemExit unwinds through run_tests, which ends the tests' processes on its way out
    raise SystemExit(128 + signum)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?",
                   help="where to write the student copy (with --grade: the submission)")
    p.add_argument("names", nargs="*", metavar="NAME", help="assignments (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the assignments")
    mode.add_argument("--grade", action="store_true",
                      help="grade the functions in FOLDER, a student's copy")
    mode.add_argument("--verify", action="store_true",
                      help="check every grader list against stubbed copies")
    p.add_argument("--timeout", type=positive_seconds, metavar="SECONDS",
                   help=f"time limit of each grading run (default: {LIMIT_FACTOR}x the "
                        f"reference's grading time, at least {MIN_LIMIT_S} s)")
    args = p.parse_args(argv)
    if (args.verify or args.list) and args.folder:      # they take names only
        args.names.insert(0, args.folder)
        args.folder = None
    names = args.names or list(ASSIGNMENTS)
    unknown = [n for n in names if n not in ASSIGNMENTS]
    if unknown:
        p.error(f"unknown assignment(s) {', '.join(unknown)}; "
                "python -m course.assign --list shows them")
    if args.list:
        print_list()
        return 0
    if args.verify:
        return 0 if verify(names) else 1
    if not args.folder:
        p.error("give OUT_DIR (or --list, --grade SUBMISSION_DIR, --verify)")
    folder = Path(args.folder)
    if args.grade:
        if not folder.exists():
            p.error(f"no such folder: {folder}")
        if not folder.is_dir():
            p.error(f"{folder} is not a folder; give the folder of a student's copy")
        # a kill or a closed terminal stops grading as Ctrl-C does (a grader started with Ctrl-C
        # ignored, as a shell starts a job in the background, ignores it like any program)
        stops = (signal.SIGTERM, signal.SIGHUP)
        previous = [signal.signal(s, stop_on_signal) for s in stops]
        try:
            return 0 if grade(folder, names, args.timeout) else 1
        except KeyboardInterrupt:
            print("interrupted: grading stopped, and every test process with it", file=sys.stderr)
            return 130
        finally:
            for s, handler in zip(stops, previous):
                signal.signal(s, handler)
    check_output_folder(p, folder)
    try:
        out = write_copy(folder, names)
    except OSError as e:
        p.error(f"cannot write the copy to {folder}: {e.strerror or e}")
    print(f"wrote a student copy to {out} with {len(names)} assignment(s) stubbed")
    for name in names:
        print(f"{name}: write {', '.join(ASSIGNMENTS[name]['functions'])}")
    print("grading takes these functions and nothing else: helpers and imports go inside them")
    print((f"grade it with: python -m course.assign --grade {out} "
           f"{' '.join(args.names)}").rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
