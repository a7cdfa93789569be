"""The built-in model: its procedural videos with questions (videos) and its training (train)."""
