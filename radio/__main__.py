"""``python -m radio ...`` (also under ``torchrun --nproc-per-node N -m radio train``)."""

import sys

from radio.cli import main

sys.exit(main())
