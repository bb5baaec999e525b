"""Entry point of the frozen `xllm` executable (the same as `python -m xllm`)."""

from xllm.cli.main import main

raise SystemExit(main())
