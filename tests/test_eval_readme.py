"""README's evaluation recipe runs as written: executed by bash with `robustmerge` stubbed
to record its arguments (the real run on a tiny model takes minutes), every command must
parse with the real CLI parser, and `merge -o` must find its parent folder made."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from robustmerge_kernels.cli import build_parser
from robustmerge_kernels.eval.tasks import load_registry

README = os.path.join(os.path.dirname(__file__), "..", "README.md")

STUB = r"""
robustmerge() {
  "$PY" - "$@" <<'PYEOF'
import json, os, sys
args = sys.argv[1:]
if args[0] == "merge":
    out = args[args.index("-o") + 1]
    if not os.path.isdir(os.path.dirname(out) or "."):
        sys.exit(f"merge: no folder {os.path.dirname(out)!r} for -o {out}")
with open("calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
PYEOF
}
"""


def _recipe() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Evaluating merged adapters") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    recipes = [b for b in blocks if "robustmerge eval-report" in b]
    assert len(recipes) == 1, "the section has one recipe block ending in eval-report"
    return recipes[0]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_readme_recipe_runs_as_written(tmp_path):
    script = "set -euo pipefail\n" + STUB + _recipe()
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(x) for x in open(tmp_path / "calls.jsonl")]
    commands = [c[0] for c in calls]
    assert commands.count("eval") == 10 and commands.count("merge") == 1 and commands[-1] == "eval-report"
    parser = build_parser()
    for argv in calls:
        parser.parse_args(argv)  # exits (SystemExit) on an unknown or malformed option
    individual = [c for c in calls if "--adapter-task" in c]
    seen = sorted(t for t, spec in load_registry().tasks.items() if spec.group == "seen")
    assert sorted(c[c.index("--adapter-task") + 1] for c in individual) == seen
