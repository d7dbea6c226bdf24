"""The README's Python API example runs as written (next to the demo media)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(monkeypatch, capsys):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(ROOT / "tests" / "fixtures" / "media")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip()
    assert namespace["handle"].result().finish_reason == "length" and len(namespace["handle"].result().tokens) == 8
    assert namespace["yes"].logprob < 0 and namespace["yes"].logprob != namespace["no"].logprob
