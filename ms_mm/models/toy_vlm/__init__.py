"""The toy vision-language family: exercises the training engine in seconds (see modeling.py)."""
