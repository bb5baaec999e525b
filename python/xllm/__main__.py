"""`python -m xllm` is the `xllm` command."""

from xllm.cli.main import main

raise SystemExit(main())
