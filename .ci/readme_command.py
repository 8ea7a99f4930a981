"""Print one of the README's Quick start commands, as written: ``demo`` (the block ending in ``flagm3 demo``) or
``test`` (the block that runs pytest). .ci/run runs them verbatim, so README and CI cannot drift apart."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
wanted = {"demo": "flagm3 demo", "test": "pytest"}[sys.argv[1]]
found = [b.strip() for b in blocks if wanted in b and "pip install torch==" in b]
if len(found) != 1:
    sys.exit(f"README.md: expected one Quick start block with 'pip install torch==' and {wanted!r}, found {len(found)}")
print(found[0])
