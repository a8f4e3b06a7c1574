"""``python -m grpo_lab.answer``: see :mod:`grpo_lab.answer`."""

import sys

from grpo_lab.answer import main

sys.exit(main())
