"""pytest runs the notebooks in quick mode unless LORA_QUICK is set explicitly.

This runs before any notebook kernel starts, and kernels inherit the environment.
"""

import os

os.environ.setdefault("LORA_QUICK", "1")
