"""The memory planner page: HTML, script and style served by `xllm serve` (no CDN)."""
