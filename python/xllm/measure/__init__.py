"""Measuring a model as clients experience it: `xllm profile` and `xllm benchmark`."""
