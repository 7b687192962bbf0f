"""Finding, stubbing and replacing one function in a source file, and copying the project: what
a student copy (assign.py) and a graded copy (grading.py) are made of."""

import ast
import io
import re
import shutil
import subprocess
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# what a copy leaves out when the project is not a git checkout
NOT_COPIED = {".git", "runs", "data", "__pycache__", ".pytest_cache"}


# -----------------------------------------------------------------------------
# finding a function and replacing its body or the whole of it

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


SHAPE = re.compile(r"#\s*(\([^()]*,[^()]*\))")   # a trailing "# (B, L, n_tokens) ..." comment


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


def replace_body(source, qualname, make_body):
    """source with qualname's body (after its docstring) replaced by the lines make_body(func,
    first, last) returns, indented as the body was."""
    lines = source.splitlines(keepends=True)
    func = find_function(ast.parse(source), qualname)
    first, last = body_lines(func, lines)
    indent = " " * func.body[0].col_offset
    body = [f"{indent}{line}\n" for line in make_body(func, first, last)]
    return "".join(lines[:first - 1] + body + lines[last:])


def stub_message(module, qualname, assignment):
    return f"{module}.{qualname}: {assignment} — see the docstring"


def stub_function(source, qualname, assignment, module):
    """source with qualname's body (after its docstring) replaced by shape hints and a raise."""
    def stub(func, first, last):
        hints = shape_hints(source, func, first, last)
        return ((["# shapes in the reference solution:"] + [f"#   {h}" for h in hints]
                 if hints else [])
                + [f"raise NotImplementedError({stub_message(module, qualname, assignment)!r})"])
    return replace_body(source, qualname, stub)


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


def function_lines(source, func):
    """The lines of func, decorators included."""
    first = min([func.lineno] + [d.lineno for d in func.decorator_list])
    return source.splitlines(keepends=True)[first - 1:func.end_lineno]


def replace_function(source, qualname, new_lines, new_indent):
    """source with qualname (decorators included) replaced by new_lines, whose def line was
    indented by new_indent columns; they are shifted to where qualname stands."""
    func = find_function(ast.parse(source), qualname)
    lines = source.splitlines(keepends=True)
    old, new = " " * func.col_offset, " " * new_indent
    shifted = [old + line[len(new):] if line.startswith(new) else line for line in new_lines]
    if shifted and not shifted[-1].endswith("\n"):
        shifted[-1] += "\n"
    first = min([func.lineno] + [d.lineno for d in func.decorator_list])
    return "".join(lines[:first - 1] + shifted + lines[func.end_lineno:])


# -----------------------------------------------------------------------------
# copies of the project

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


def copy_project(out, root=REPO):
    """The project's files copied into out (new or empty)."""
    for rel in project_files(root):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)
    return out


def edit(root, target, change):
    """Apply change(source, qualname, module) to the file of target ("file.py:Qualname")."""
    file, module, qualname = split_target(target)
    path = root / file
    path.write_text(change(path.read_text(), qualname, module))
