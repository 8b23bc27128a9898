"""Where the read-only shared corpus lives (real alloys, published samples).

One place for the path: override with FORGE_SHARED when the corpus sits
elsewhere.
"""

import os
from pathlib import Path

SHARED = Path(os.environ.get("FORGE_SHARED", "/work/shared"))
CORPUS = SHARED / "corpus"
SAMPLES = CORPUS / "samples"
ALLOYS = CORPUS / "alloys"
