"""`consa` on the GPU machine, where the package is on PYTHONPATH but not installed (no entry point)."""
import sys

from consa_cli.cli import run

sys.argv[0] = "consa"
run()
