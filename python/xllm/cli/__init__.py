"""The `xllm` command line."""
