"""``python -m sparsellm`` (and ``torchrun -m sparsellm``): the command line."""

from sparsellm.cli import main

raise SystemExit(main())
