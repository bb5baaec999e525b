"""Files shipped with the package: `pride_and_prejudice.txt`, the evaluation text of `xllm
compare` (the opening chapters of Jane Austen's novel, 1813, in the public domain)."""
