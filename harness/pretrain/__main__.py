"""``python -m harness.pretrain NAME``: see :mod:`harness.pretrain`."""

from . import main

main()
