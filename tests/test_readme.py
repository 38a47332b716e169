"""The README's Python example prints what the README says it prints."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def example_and_output() -> tuple[str, str]:
    section = README.read_text().split("## In Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"It prints:\s*```text\n(.*?)```", section, re.S).group(1)
    return code, printed


def test_readme_python_example_prints_what_it_promises(tmp_path):
    code, printed = example_and_output()
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed
