"""Writes a synthetic two-class data set: points in 8 dimensions whose class
is decided by a hidden linear rule (plus label noise). train.csv and
test.csv go to $DATA."""
import os
import random

DIM = 8
rng = random.Random(42)
hidden = [rng.uniform(-2, 2) for _ in range(DIM)]
bias = 0.5


def sample(n):
    rows = []
    for _ in range(n):
        x = [rng.gauss(0, 1) * 3 + 1 for _ in range(DIM)]
        score = sum(w * v for w, v in zip(hidden, x)) + bias
        y = 1 if score > 0 else 0
        if rng.random() < 0.03:  # label noise
            y = 1 - y
        rows.append((x, y))
    return rows


data = os.environ["DATA"]
os.makedirs(data, exist_ok=True)
for name, n in (("train.csv", 8000), ("test.csv", 2000)):
    with open(os.path.join(data, name), "w") as f:
        for x, y in sample(n):
            f.write(",".join(f"{v:.6f}" for v in x) + f",{y}\n")
print(f"generated 8000 training and 2000 test points in {DIM} dimensions")
