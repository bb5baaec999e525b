"""Engines that run models; today llama.cpp through the Rust batching loop."""
