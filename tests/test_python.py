"""What proactor asks of the Python running it."""
from __future__ import annotations

import subprocess
import sys


def test_refuses_to_load_without_the_gil():
    """A free-threaded build running without the GIL (none is installed here: the check
    is made to see one) gets a clear ImportError, not races."""
    code = ("import sys; sys._is_gil_enabled = lambda: False\n"
            "try:\n    import proactor\n"
            "except ImportError as e:\n    print('refused:', e)\n"
            "else:\n    print('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("refused: proactor needs the GIL"), out
    assert "PYTHON_GIL=1" in out


def test_loads_with_the_gil():
    code = "import proactor; print(proactor.Engine)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "Engine" in out
