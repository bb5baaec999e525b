"""Model names, files, metadata and chat templates."""
