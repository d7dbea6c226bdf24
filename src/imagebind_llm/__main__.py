"""``python -m imagebind_llm``: the same as the ``imagebind-llm`` command."""

import sys

from imagebind_llm.cli import main

sys.exit(main())
