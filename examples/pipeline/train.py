"""Data-parallel logistic regression, one process per gang member.

Rank r trains on the shards j with j % WORLD_SIZE == r. Every step each rank
computes its gradient; rank 0 listens on MASTER_ADDR:MASTER_PORT, gathers the
others' gradients over TCP, averages them with its own and sends the average
back, so every rank applies the same update (an all-reduce through rank 0).
Rank 0 writes the model to $DATA/model.json."""
import glob
import json
import math
import os
import socket
import time

data = os.environ["DATA"]
rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
addr = os.environ["MASTER_ADDR"]
port = int(os.environ["MASTER_PORT"])
epochs = int(os.environ.get("EPOCHS", "30"))
rate = float(os.environ.get("LEARNING_RATE", "0.5"))

rows = []
for path in sorted(glob.glob(os.path.join(data, "shard-*.csv"))):
    shard = int(path.rsplit("-", 1)[1].split(".")[0])
    if shard % world == rank:
        rows += [[float(v) for v in line.split(",")] for line in open(path)]
dim = len(rows[0]) - 1
w = [0.0] * (dim + 1)  # weights, then bias


def gradient(w):
    g = [0.0] * (dim + 1)
    for r in rows:
        z = sum(wi * xi for wi, xi in zip(w, r[:dim])) + w[dim]
        p = 1 / (1 + math.exp(-max(-30, min(30, z))))
        e = p - r[dim]
        for j in range(dim):
            g[j] += e * r[j]
        g[dim] += e
    return g, len(rows)


def send(sock, obj):
    sock.sendall((json.dumps(obj) + "\n").encode())


def lines(sock):
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


if rank == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(world)
    peers = []
    while len(peers) < world - 1:
        conn, _ = server.accept()
        peers.append((conn, lines(conn)))
    for epoch in range(epochs):
        g, n = gradient(w)
        for _, reader in peers:
            msg = next(reader)
            g = [a + b for a, b in zip(g, msg["g"])]
            n += msg["n"]
        avg = [v / n for v in g]
        for conn, _ in peers:
            send(conn, {"g": avg})
        w = [wi - rate * gi for wi, gi in zip(w, avg)]
    with open(os.path.join(data, "model.json"), "w") as f:
        json.dump({"w": w, "world": world, "epochs": epochs}, f)
    print(f"rank 0: trained {epochs} epochs with {world} ranks; model written")
else:
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=60)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    reader = lines(conn)
    for epoch in range(epochs):
        g, n = gradient(w)
        send(conn, {"g": g, "n": n})
        avg = next(reader)["g"]
        w = [wi - rate * gi for wi, gi in zip(w, avg)]
    print(f"rank {rank}: done")
