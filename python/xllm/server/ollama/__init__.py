"""The Ollama dialect (`/api/...`): a translation over the same serving layer as OpenAI's."""
