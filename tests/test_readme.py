"""The README's two set-up commands are what CI and users actually run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    marker = readme.index("<!-- test-command")
    test_cmd = bash_blocks(readme[marker:])[0].strip()
    awk = subprocess.run(["bash", "-c", "awk '/<!-- test-command/{found=1; next} found && /^```bash/{inblock=1; next} "
                          "inblock && /^```/{exit} inblock{print}' README.md"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert awk == test_cmd
    assert "pip install torch==2.13.0 &&" in test_cmd and test_cmd.endswith("python -m pytest -q")
    assert "README" in (REPO / ".ci/run").read_text()


def test_readme_demo_command_installs_cpu_torch_first_and_runs_the_demo():
    demo = next(b.strip() for b in bash_blocks((REPO / "README.md").read_text()) if b.strip().endswith("factory demo"))
    assert demo.index("pip install torch==2.13.0") < demo.index("pip install -e .")
