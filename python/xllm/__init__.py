"""xllm: a local LLM inference server and CLI with the OpenAI and Ollama APIs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xllm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from xllm.api import serve

__all__ = ["__version__", "serve"]
