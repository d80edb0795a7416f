"""The README's runnable Python example works as written."""

import ast
import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_tiny_model_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    examples = [block for block in blocks if "FlashSlothConfig(" in block]
    assert len(examples) == 1
    result = subprocess.run([sys.executable, "-c", examples[0]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    generated = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # the example prints token ids
    assert len(generated) == 5 and all(0 <= token < 128 for token in generated)
