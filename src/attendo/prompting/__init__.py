"""Prompt engineering: templates and few-shot examples (templates.py), and the `attendo prompt`
command (commands.py)."""
