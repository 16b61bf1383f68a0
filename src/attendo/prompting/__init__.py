"""Prompt engineering: structured output (grammar.py, the sampler's grammar stage) and tool calls
(tools.py)."""
