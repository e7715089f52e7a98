"""Shard $WEFT_TASK_INDEX of $SHARDS: every SHARDS-th training row, features
standardised with statistics of the whole training set (each shard computes
them; the data set is small), written to $DATA/shard-N.csv."""
import os

data = os.environ["DATA"]
index = int(os.environ["WEFT_TASK_INDEX"])
shards = int(os.environ["SHARDS"])

rows = [line.strip().split(",") for line in open(os.path.join(data, "train.csv"))]
xs = [[float(v) for v in r[:-1]] for r in rows]
dim = len(xs[0])
mean = [sum(x[j] for x in xs) / len(xs) for j in range(dim)]
std = [(sum((x[j] - mean[j]) ** 2 for x in xs) / len(xs)) ** 0.5 or 1.0 for j in range(dim)]

out = os.path.join(data, f"shard-{index}.csv")
with open(out, "w") as f:
    for i in range(index, len(rows), shards):
        z = [(xs[i][j] - mean[j]) / std[j] for j in range(dim)]
        f.write(",".join(f"{v:.6f}" for v in z) + f",{rows[i][-1]}\n")
with open(os.path.join(data, "stats.csv"), "w") as f:
    f.write(",".join(map(str, mean)) + "\n" + ",".join(map(str, std)) + "\n")
print(f"shard {index}/{shards}: wrote {out}")
