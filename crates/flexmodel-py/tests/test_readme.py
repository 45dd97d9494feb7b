"""Every Python block of the README runs as it is, from the repository root (a block that
starts with `# mpirun -n N` runs under mpirun on N ranks)."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT, mpirun

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    script = tmp_path / "block.py"
    script.write_text(block)
    monkeypatch.chdir(ROOT)
    launch = re.match(r"# mpirun -n (\d+)", block)
    if launch:
        run = mpirun(int(launch.group(1)), str(script))
    else:
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
