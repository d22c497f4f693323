"""Reading the trainer's Megatron-style log lines in tests."""
import numpy as np


def logged(log: str, name: str) -> np.ndarray:
    """Per logged iteration, the value of `| name: value |` (`[a b ...]` lists as rows): [iterations, n]."""
    rows = []
    for line in log.splitlines():
        if f"| {name}: " in line:
            value = line.split(f"| {name}: ")[1].split(" |")[0]
            rows.append([float(v) for v in value.strip("[]").split()])
    return np.asarray(rows)
