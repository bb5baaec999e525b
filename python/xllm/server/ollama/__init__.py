"""The Ollama dialect (`/api/...`): a translation over the same engine seam as OpenAI's."""
