"""The HTTP server: aiohttp app, route table, middlewares and the two API dialects."""
