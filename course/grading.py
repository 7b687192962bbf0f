"""Grading a submission: which of its code is used, how the tests run, what passes.

Grading trusts this project, not the submission. Each assignment is graded in a fresh copy of this
project into which only that assignment's functions are taken from the submission (by name, the
whole def with its decorators): the submission's tests, conftest.py, pytest configuration and
plugins are never read, the other assignments' functions are the reference's (so a failure is the
fault of the assignment it is reported under), and pytest runs with this project's configuration
and course/grading_plugin.py alone. A run has a time limit, after which it is killed with every
process it started; so is a run whose grader is interrupted. course/README.md says what this
protects and what it does not.
"""

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from course.assignments import ASSIGNMENTS
from course.functions import REPO, copy_project, edit, find_function, function_lines, \
    replace_function, split_target

# the default time limit of a grading run: this many times the reference's grading time
LIMIT_FACTOR = 5
MIN_LIMIT_S = 60


# -----------------------------------------------------------------------------
# the graded copy: this project with one assignment's functions from the submission

def submitted_function(submission, target):
    """(lines, indent) of target's function in the submission, decorators included; LookupError
    saying what is missing when it cannot be read."""
    file, _, qualname = split_target(target)
    path = submission / file
    if not path.is_file():
        raise LookupError(f"the submission has no {file}")
    source = path.read_text(errors="replace")
    try:
        func = find_function(ast.parse(source), qualname)
    except SyntaxError as e:
        where = f" at line {e.lineno}" if e.lineno else ""
        raise LookupError(f"{file} does not parse{where}: {e.msg}") from None
    except LookupError as e:
        raise LookupError(f"{file}: {e}") from None
    return function_lines(source, func), func.col_offset


def is_reference(submission, name, root=REPO):
    """Whether every function of the assignment in the submission is the reference's, line for
    line."""
    try:
        return all(submitted_function(submission, t) == submitted_function(root, t)
                   for t in ASSIGNMENTS[name]["functions"])
    except LookupError:
        return False


def graded_copy(out, submission, name, root=REPO):
    """This project copied into out with the assignment's functions taken from the submission.
    Returns what stopped that (a file or function missing, a file that does not parse), if
    anything: each is the student's failure."""
    copy_project(out, root)
    problems = []
    for target in ASSIGNMENTS[name]["functions"]:
        try:
            lines, indent = submitted_function(submission, target)
        except LookupError as e:
            problems.append(str(e))
            continue
        edit(out, target, lambda source, qualname, module: replace_function(
            source, qualname, lines, indent))
    return problems


# -----------------------------------------------------------------------------
# running tests in a copy, within a time limit

def defining_files(root, names):
    """{test name: the test files under root/tests that define it at their top level}."""
    found = {}
    for path in sorted((root / "tests").rglob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
                found.setdefault(node.name, []).append(path.relative_to(root).as_posix())
    return found


def descendants(pid):
    """Every process started under pid, read from /proc (none where there is no /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (command) state ppid ...": the command may hold spaces and parentheses
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_process_tree(proc):
    """Kill proc's process group and every process started under it, also one in a session of its
    own (torchrun starts its workers so). Everything is stopped first, so nothing forks or is
    orphaned while the tree is read, then killed. Once proc has ended and been reaped, its pid is
    free for reuse and its orphans are no longer under it: only its group is killed then."""
    stopped = set()
    while proc.returncode is None:
        for pid, kill in [(proc.pid, os.killpg)] + [(p, os.kill) for p in stopped]:
            try:
                kill(pid, signal.SIGSTOP)
            except OSError:                              # gone already
                pass
        new = set(descendants(proc.pid)) - stopped
        if not new:
            break
        stopped |= new
    for pid, kill in [(proc.pid, os.killpg)] + [(p, os.kill) for p in stopped]:
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def clean_env(root):
    """The grader's environment without what could change how pytest runs: options and plugins
    from PYTEST_* variables, entry-point plugins, the user's site-packages, a PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return env


class Run:
    """What one pytest run in a copy did: outcomes {node id: (name, outcome, message)} with
    outcome "passed", "failed" (a failure or an error) or "skipped"; the test names it collected;
    its collection errors; the test it was running when it stopped; whether it finished or timed
    out; its last line of output; the seconds it took."""

    def __init__(self, log, output, finished, timed_out, seconds):
        self.outcomes, self.collected, self.errors, self.running = {}, set(), [], None
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:                 # the last line of a killed run
                continue
            if "collected" in event:
                self.collected = set(event["collected"])
            elif "collect_error" in event:
                self.errors.append(f"{event['collect_error']}: {event['message']}")
            elif "start" in event:
                self.running = event["start"]
            else:
                self.record(event)
        self.finished, self.timed_out, self.seconds = finished, timed_out, seconds
        tail = output.read_text(errors="replace").strip().splitlines() if output.exists() else []
        self.last_output = tail[-1] if tail else ""

    def record(self, event):
        """A test's outcome is its call's, or its setup's when that failed or skipped; an error in
        its teardown fails it. A test stopped in its call has none."""
        node, outcome, when = event["nodeid"], event["outcome"], event["when"]
        if (when == "call" or (when == "setup" and outcome != "passed")
                or (when == "teardown" and outcome == "failed")):
            if self.outcomes.get(node, ("", ""))[1] != "failed":
                self.outcomes[node] = (event["name"], outcome, event["message"])
        if when == "teardown" and self.running == node:
            self.running = None


def run_tests(root, work, files, names=(), limit=None):
    """Run the tests called `names` (all when empty) of `files` in the copy at root, with this
    project's pytest configuration and plugin alone, writing only under work; stopped, with every
    process it started, after `limit` seconds or when the grader is interrupted."""
    work.mkdir(parents=True, exist_ok=True)
    log, output = work / "events.jsonl", work / "output.txt"
    cmd = [sys.executable, "-m", "pytest", "-c", str(root / "pytest.ini"), "--rootdir", str(root),
           "--confcutdir", str(root), "--basetemp", str(work / "tmp"), "-p", "no:cacheprovider",
           "-p", "course.grading_plugin", "--grade-log", str(log),
           "--grade-names", ",".join(names), *files]
    start = time.monotonic()
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=clean_env(root), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            end_process_tree(proc)
    # pytest exits 0 (all passed), 1 (some failed) or 5 (nothing collected) when it ran to the end
    finished = not timed_out and proc.returncode in (0, 1, 5)
    return Run(log, output, finished, timed_out, time.monotonic() - start)


# -----------------------------------------------------------------------------
# verdicts

def default_limit(names):
    return max(MIN_LIMIT_S, LIMIT_FACTOR * sum(ASSIGNMENTS[n]["seconds"] for n in names))


def judge(name, run, defined):
    """(passed, summary, detail lines) of one assignment from a run of its graders."""
    graders = ASSIGNMENTS[name]["graders"]
    mine = {node: o for node, o in run.outcomes.items() if o[0] in graders}
    failed = sorted(node for node, (_, outcome, _) in mine.items() if outcome == "failed")
    passed = sum(outcome == "passed" for _, outcome, _ in mine.values())
    skipped = len(mine) - passed - len(failed)
    details = [f"    FAILED {node}: {mine[node][2][:160]}" for node in failed]
    details += [f"    could not collect {e[:160]}" for e in run.errors]
    if run.finished and not run.errors:
        stale = sorted(g for g in graders if g not in run.collected)
        details += [f"    stale grader list: {g} is "
                    f"{'not collected' if g in defined else 'defined by no test file'} (renamed "
                    f"or removed?); python -m course.assign --verify {name} re-derives the "
                    "list; this is no failure of the student's" for g in stale]
    counts = f"{passed} passed, {len(failed)} failed" + (f", {skipped} skipped" if skipped else "")
    if run.timed_out:
        where = f" in {run.running}" if run.running else ""
        return False, f"(timed out after {run.seconds:.0f} s{where}) {counts}", details
    if not run.finished:
        return False, f"(the test run stopped: {run.last_output[:120]}) {counts}", details
    ok = passed > 0 and not failed and not run.errors
    reason = "" if ok or failed or run.errors else " (no grading test passed)"
    return ok, f"{counts} in {run.seconds:.0f} s{reason}", details


def grade(submission, names, timeout=None, root=REPO):
    """Grade the named assignments of the submission folder. Each is run in its own copy of this
    project holding only its functions from the submission; assignments whose functions are the
    reference's share one run of the reference. Prints the details, then one PASS / FAIL line per
    assignment; returns True when all pass."""
    submission = Path(submission).resolve()
    same = [n for n in names if is_reference(submission, n, root)]
    runs = ([same] if same else []) + [[n] for n in names if n not in same]
    verdicts = {}
    with tempfile.TemporaryDirectory(prefix="grading-") as tmp:
        for group in runs:
            work = Path(tmp) / group[0]
            copy = work / "project"
            if group is same:
                copy_project(copy, root)
                print(f"{', '.join(group)}: the functions are the reference's; graded in one run")
                problems = []
            else:
                problems = graded_copy(copy, submission, group[0], root)
            if problems:
                verdicts[group[0]] = (False, "(" + "; ".join(problems) + ")", [])
                continue
            graders = sorted({g for n in group for g in ASSIGNMENTS[n]["graders"]})
            defined = defining_files(copy, graders)
            files = sorted({f for fs in defined.values() for f in fs})
            limit = timeout or default_limit(group)
            print(f"grading {', '.join(group)}: {len(graders)} graders in {len(files)} test "
                  f"files, time limit {limit:.0f} s", flush=True)
            # no file defines any grader: every one is stale, and there is nothing to run
            run = (run_tests(copy, work, files, graders, limit) if files
                   else Run(work / "no-log", work / "no-output", True, False, 0.0))
            for n in group:
                verdicts[n] = judge(n, run, defined)
    for name in names:
        ok, summary, details = verdicts[name]
        if details:
            print(f"{name}:\n" + "\n".join(details))
    width = max(len(n) for n in names)
    for name in names:
        ok, summary, _ = verdicts[name]
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {summary}")
    return all(verdicts[n][0] for n in names)
