"""Running the chelsea command as a user would."""

import subprocess
import sys


def chelsea_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "chelsea.cli", *args], capture_output=True, text=True, timeout=timeout)
