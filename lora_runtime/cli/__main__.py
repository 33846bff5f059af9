"""`python -m lora_runtime.cli` (what torchrun launches) is the `lora-runtime` command."""

import sys

from lora_runtime.cli import main

sys.exit(main())
