"""The pytest plugin grading loads (`-p course.grading_plugin`).

It keeps only the tests named by --grade-names (test function names: a test is found whatever
file holds it, with all its parameter sets), and appends every event to the --grade-log file as
one JSON line, flushed at once, so a run that is killed at its time limit still says how far it
got. Events: {"collected": [names]}, {"start": node id}, {"collect_error": node id, "message"},
{"nodeid", "name", "when", "outcome", "message"}.
"""

import json


def pytest_addoption(parser):
    group = parser.getgroup("grading")
    group.addoption("--grade-names", default="", help="comma-separated test function names")
    group.addoption("--grade-log", default=None, help="file to append JSON-line events to")


def pytest_configure(config):
    path = config.getoption("grade_log")
    if path:
        names = {n for n in config.getoption("grade_names").split(",") if n}
        config.pluginmanager.register(Recorder(path, names), "grading-recorder")


def first_line(report):
    """The line that says what went wrong: the exception's own first line when pytest kept it,
    else the last line of the report (an import error while collecting ends with the error)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = [line for line in (crash.message if crash else str(report.longrepr)).splitlines()
             if line.strip()]
    if not lines:
        return ""
    return lines[0] if crash else lines[-1].removeprefix("E").strip()


class Recorder:
    def __init__(self, path, names):
        self.path, self.names, self.name_of = path, names, {}

    def write(self, **event):
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def pytest_collection_modifyitems(self, config, items):
        self.name_of = {item.nodeid: getattr(item, "originalname", item.name) for item in items}
        if self.names:
            keep = [item for item in items if self.name_of[item.nodeid] in self.names]
            kept = {id(item) for item in keep}
            config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
            items[:] = keep
        self.write(collected=sorted({self.name_of[item.nodeid] for item in items}))

    def pytest_collectreport(self, report):
        if report.failed:
            self.write(collect_error=report.nodeid, message=first_line(report))

    def pytest_runtest_logstart(self, nodeid, location):
        self.write(start=nodeid)

    def pytest_runtest_logreport(self, report):
        self.write(nodeid=report.nodeid, name=self.name_of.get(report.nodeid, report.nodeid),
                   when=report.when, outcome=report.outcome,
                   message=first_line(report) if report.failed else "")
