"""Scores the trained model on the held-out test set (standardised with the
training statistics) and prints the accuracy (also to $DATA/accuracy.txt)."""
import json
import math
import os

data = os.environ["DATA"]
model = json.load(open(os.path.join(data, "model.json")))
w = model["w"]
mean, std = (
    [float(v) for v in line.split(",")]
    for line in open(os.path.join(data, "stats.csv")).read().split()
)
dim = len(mean)
right = total = 0
for line in open(os.path.join(data, "test.csv")):
    r = [float(v) for v in line.split(",")]
    z = sum(w[j] * (r[j] - mean[j]) / std[j] for j in range(dim)) + w[dim]
    right += (1 if z > 0 else 0) == int(r[dim])
    total += 1
accuracy = right / total
print(f"accuracy: {accuracy:.3f} on {total} test points (model of {model['world']} ranks, {model['epochs']} epochs)")
with open(os.path.join(data, "accuracy.txt"), "w") as f:
    f.write(f"{accuracy:.3f}\n")
