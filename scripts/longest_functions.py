"""The longest functions of a package (lines from ``def`` to the end of the body), longest first.

    python scripts/longest_functions.py [PACKAGE_DIR] [N]     # defaults: batchmask 12

The layout rule in docs/design.md: no function over 80 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def longest(root: Path) -> list[tuple[int, str]]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "batchmask")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    for lines, where in longest(root)[:n]:
        print(lines, where)
