"""Makes the helpers next to this file (lora_testlib.py) importable from the lora tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
