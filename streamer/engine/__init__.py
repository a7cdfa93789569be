"""The engine: Qwen2-VL loaded and driven layer by layer (models, runner, attention, positions, vision,
decode, prompt), the probes the memory policies ask for (probing), and the one loop that streams
frames into a memory (stream)."""
