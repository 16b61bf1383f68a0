"""Prompt engineering: templates and few-shot examples (templates.py) with the `attendo prompt`
command (commands.py), structured output (grammar.py, the sampler's grammar stage) and tool calls
(tools.py)."""
