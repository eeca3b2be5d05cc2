"""The size of ``inference/``: per module, its lines and its lines of algorithm.

Issue 10 asks for ``inference/`` smaller than the 4,378 lines it had when the issue was
filed, and for each algorithm module to read as a short composition. Issues 11 and 12 then
added new algorithms to ``inference/``, so this prints both totals: the modules that
existed at the issue's start (commit 2698e19, where the issue was worked) and those added
since.

"Lines of algorithm" are the code lines: every line minus blank lines, comment-only
lines, docstrings (module, class and function) and import statements.

    .venv/bin/python scripts/inference_size.py [--base REV] [--dir inference]
"""
from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the commit at which issue 10 was worked (its modules are "the issue's start")
BASE = "2698e19"


def algorithm_lines(source: str) -> int:
    """Code lines of ``source``: not blank, not only a comment, not in a docstring, not
    in an import statement."""
    lines = source.splitlines()
    excluded = {i for i, line in enumerate(lines, 1) if not line.strip()}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not lines[tok.start[0] - 1][:tok.start[1]].strip():
            excluded.add(tok.start[0])
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            excluded.update(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                excluded.update(range(body[0].lineno, body[0].end_lineno + 1))
    return len(lines) - len(excluded)


def existed_at(rev: str, path: str) -> bool:
    """Whether ``path`` (relative to the repository) existed at commit ``rev``."""
    return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"], cwd=ROOT,
                          capture_output=True).returncode == 0


def table(folder: str = "inference", rev: str = BASE) -> list[tuple[str, int, int, bool]]:
    """(module, total lines, lines of algorithm, existed at ``rev``) per module."""
    rows = []
    for path in sorted((ROOT / folder).glob("*.py")):
        source = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        rows.append((path.name, len(source.splitlines()), algorithm_lines(source), existed_at(rev, rel)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the commit of the issue's start (default %(default)s)")
    parser.add_argument("--dir", default="inference")
    args = parser.parse_args()
    rows = table(args.dir, args.base)
    print(f"{'module':<24}{'lines':>7}{'algorithm':>11}  existed at {args.base}")
    for name, total, algo, old in sorted(rows, key=lambda r: (not r[3], r[0])):
        print(f"{name:<24}{total:>7}{algo:>11}  {'yes' if old else 'no (added since)'}")
    for label, keep in (("existed at the issue's start", True), ("added since (issues 11, 12, 14)", False)):
        part = [r for r in rows if r[3] == keep]
        print(f"{label + f' ({len(part)} modules)':<44}{sum(r[1] for r in part):>7} lines, "
              f"{sum(r[2] for r in part):>6} of algorithm")
    print(f"{'all of ' + args.dir + '/':<44}{sum(r[1] for r in rows):>7} lines, {sum(r[2] for r in rows):>6} of algorithm")


if __name__ == "__main__":
    main()
