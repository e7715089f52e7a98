"""Weft's Python client.

    import weft
    c = weft.Client("127.0.0.1:7100")              # any members; token=, ca=, cert=, key=
    app = c.submit("examples/pipeline/pipeline.yaml")
    report = app.wait()                            # a bar per stage (tqdm when installed)
    print(report.state, app.logs("train/0"))
"""

from weft.client import FINISHED, Application, Client, Endpoint, Report, Stage, WeftError, Why

__all__ = ["Application", "Client", "Endpoint", "FINISHED", "Report", "Stage", "WeftError", "Why"]
