"""Serves the pipeline's trained model over HTTP (one replica of the
service in service.yaml): POST /predict with {"x": [8 numbers]} answers
{"label": 0 or 1, "score": ..., "replica": N}; GET /healthz answers 200
once the model is loaded. Listens on $WEFT_PORT_HTTP (given by Weft)."""
import http.server
import json
import os

data = os.environ["DATA"]
model = json.load(open(os.path.join(data, "model.json")))
w = model["w"]
mean, std = (
    [float(v) for v in line.split(",")]
    for line in open(os.path.join(data, "stats.csv")).read().split()
)
dim = len(mean)
replica = int(os.environ.get("WEFT_TASK_INDEX", "0"))


def score(x):
    return sum(w[j] * (x[j] - mean[j]) / std[j] for j in range(dim)) + w[dim]


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, code, body):
        out = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        if self.path == "/healthz":
            self.answer(200, {"ok": True, "replica": replica})
        else:
            self.answer(404, {"error": "GET /healthz or POST /predict"})

    def do_POST(self):
        if self.path != "/predict":
            return self.answer(404, {"error": "POST /predict"})
        try:
            n = int(self.headers.get("content-length", "0"))
            if n > 1 << 16:
                raise ValueError("body over 64 KiB")
            x = json.loads(self.rfile.read(n))["x"]
            if len(x) != dim:
                raise ValueError(f"x: {len(x)} numbers; the model takes {dim}")
            z = score([float(v) for v in x])
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(400, {"error": str(e)})
        self.answer(200, {"label": 1 if z > 0 else 0, "score": z, "replica": replica})

    def log_message(self, *args):
        pass


port = int(os.environ["WEFT_PORT_HTTP"])
print(f"replica {replica}: serving the model ({model['epochs']} epochs) on port {port}", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
