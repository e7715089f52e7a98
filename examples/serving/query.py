"""Queries the model server through its endpoints: reads them (the JSON of
`rmctl -o json app endpoints ID`) from stdin, sends each row of
$DATA/test.csv to the replicas in turn, and prints the accuracy and how
many answers each replica gave."""
import json
import os
import sys
import urllib.request

endpoints = json.load(sys.stdin)
if not endpoints:
    sys.exit("no healthy replicas listed")
urls = [f"http://{e['host']}:{e['ports']['http']}/predict" for e in endpoints]
answered = {}
right = total = 0
for i, line in enumerate(open(os.path.join(os.environ["DATA"], "test.csv"))):
    r = [float(v) for v in line.split(",")]
    req = urllib.request.Request(
        urls[i % len(urls)],
        data=json.dumps({"x": r[:-1]}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.load(resp)
    answered[out["replica"]] = answered.get(out["replica"], 0) + 1
    right += out["label"] == int(r[-1])
    total += 1
print(f"served accuracy: {right / total:.3f} on {total} test points")
for replica, n in sorted(answered.items()):
    print(f"replica {replica}: {n} answers")
