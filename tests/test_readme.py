"""Every Python block of the README runs as written, in order, in one namespace."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_opens_with_the_install_and_test_commands():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(first) == 2
    assert "pip install" in first[0] and "fastsoftmax train" in first[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert first[1] in ci  # CI runs exactly the README's test command
