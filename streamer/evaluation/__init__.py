"""Benchmark evaluation: Video-MME (lmms-eval's prompt and scoring; videomme.py, answers.py, run.py,
results.py, prefetch.py) and the synthetic benchmark of the built-in model (synthetic.py). The command lines are
in streamer/cli/evaluate.py."""
