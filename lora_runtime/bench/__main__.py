"""`python -m lora_runtime.bench` is `lora-runtime bench`."""

import sys

from lora_runtime.bench.main import main

sys.exit(main())
