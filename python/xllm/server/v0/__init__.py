"""xllm's own endpoints (`/v0/...`)."""
