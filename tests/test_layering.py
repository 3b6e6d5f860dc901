"""The library (functional, nn, tools) and the data loaders never import the experiments, the
reporting or the CLI, nor the heavy plotting/logging packages."""

import subprocess
import sys


def test_library_does_not_import_experiments_or_cli():
    code = (
        "import sys, batchnorm, batchnorm.functional, batchnorm.nn, batchnorm.tools, batchnorm.data\n"
        "bad = [m for m in sys.modules if m.startswith(('batchnorm.experiments', "
        "'batchnorm.reporting', 'batchnorm.cli'))]\n"
        "heavy = [m for m in ('matplotlib', 'tensorboard') if m in sys.modules]\n"
        "print(bad, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"
