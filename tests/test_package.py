import subprocess
import sys


def test_import_is_light():
    code = "import sys, pytest_hotswap; print(sorted(m for m in ('torch', 'diffusers', 'pytest') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
