"""The Python client against a real standalone cluster: jobs submitted the
moment the process starts, followed to their end, their logs read and
followed, killed, explained; bad input refused naming the field."""

import sys
import time

import pytest

import weft

HELLO = """
name: hello
stages:
  - name: run
    instances: 2
    command: 'echo hello-$WEFT_TASK_INDEX'
    resources: { vcores: 0.2, memory: 32MiB }
"""


def job(name, command, vcores=0.2, memory="32MiB"):
    return (
        f"name: {name}\nstages:\n  - name: run\n    command: '{command}'\n"
        f"    resources: {{ vcores: {vcores}, memory: {memory} }}\n"
    )


@pytest.fixture(scope="module")
def client(cluster):
    # A dead member first: the client passes over it to the one that answers.
    with weft.Client(["127.0.0.1:1", cluster.address], timeout=60) as c:
        yield c


def test_submit_at_once_wait_and_read_the_logs(client, cluster):
    app = client.submit(HELLO)
    assert app.id.startswith("app-")
    r = app.wait(progress=False, timeout=90)
    assert r.state == "succeeded", (r, cluster.log_text()[-3000:])
    assert r.finished and r.progress == 1.0
    assert [(s.name, s.done, s.total) for s in r.stages] == [("run", 2, 2)]
    assert app.logs("run/1") == "hello-1\n"
    assert app.logs("run/0", stderr=True) == ""
    assert app.status().state == "succeeded"
    assert app.why().summary == "it succeeded"
    ids = [a.id for a in client.apps(state="succeeded", name="hello")]
    assert app.id in ids
    assert all(a.name == "hello" for a in client.apps(name="hello"))


def test_submit_a_file_and_wait_with_progress_lines(client, tmp_path, capsys, monkeypatch):
    # As where tqdm is not installed.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    spec = tmp_path / "job.toml"
    spec.write_text(
        'name = "from-file"\n[[stages]]\nname = "run"\ninstances = 3\ncommand = "true"\n'
        'resources = { vcores = 0.2, memory = "32MiB" }\n'
    )
    app = client.submit(spec, wait=True)
    assert app.status().state == "succeeded"
    err = capsys.readouterr().err
    # Without tqdm, a line per change on stderr, ending with the stage done.
    assert f"{app.id} succeeded run 3/3" in err, err


def test_logs_followed_while_the_task_writes(client):
    app = client.submit(job("talk", "for i in 1 2 3 4 5; do echo line-$i; sleep 0.4; done"))
    deadline = time.monotonic() + 60
    while True:
        try:
            pieces = app.logs("run/0", follow=True)
            first = next(pieces, "")
            break
        except weft.WeftError as e:
            # Not started yet.
            assert time.monotonic() < deadline, e
            time.sleep(0.1)
    first_at = time.time() * 1000
    text = first + "".join(pieces)
    assert text == "".join(f"line-{i}\n" for i in range(1, 6))
    r = app.wait(progress=False, timeout=60)
    assert r.state == "succeeded"
    assert first_at < r.finished_at_ms, "the first line came only after the task ended"


def test_kill_a_running_job_and_why_a_failed_one_failed(client):
    nap = client.submit(job("nap", "sleep 600"))
    nap.kill()
    assert nap.wait(progress=False, timeout=60).state == "killed"
    assert nap.why().summary.startswith("it was killed")
    hog = client.submit(job("hog", "exec tail /dev/zero"))
    r = hog.wait(progress=False, timeout=60)
    assert r.state == "failed"
    why = hog.why()
    assert why.state == "failed"
    assert why.failure["task"] == "run/0"
    assert why.failure["node_id"] == "py"
    assert "over its memory quota" in why.failure["diagnostic"], why


def test_bad_input_is_refused_naming_the_field(client):
    with pytest.raises(weft.WeftError) as e:
        client.submit(job("bad", "true", memory="0"))
    assert e.value.code == "invalid_argument"
    assert e.value.field == "stages[0].resources.memory", e.value.message
    with pytest.raises(weft.WeftError) as e:
        client.submit(job("huge", "true", vcores=64))
    assert e.value.field == "stages[0].resources.vcores", e.value.message
    assert "more than any node has" in e.value.message
    with pytest.raises(weft.WeftError) as e:
        client.app("app-999999")
    assert (e.value.code, e.value.field) == ("not_found", "application_id")
    with pytest.raises(ValueError, match="state: 'runing'"):
        client.apps(state="runing")
    with pytest.raises(ValueError, match="addresses"):
        weft.Client([])


def test_the_cluster_its_nodes_and_queues(client):
    deadline = time.monotonic() + 30
    while not client.nodes():  # the node registers a moment after the start
        assert time.monotonic() < deadline, "the node never registered"
        time.sleep(0.1)
    nodes = client.nodes()
    assert [(n["id"], n["state"], n["vcores"]) for n in nodes] == [("py", "running", 4.0)]
    assert any(q["name"] == "root" for q in client.queues())
    c = client.cluster()
    assert c["leader_id"] == 1 and len(c["members"]) == 1
    assert client.whoami()["method"] == "none"


def test_a_spec_is_text_a_path_or_a_missing_file(client, tmp_path):
    # A long one-line spec (JSON) is text, not a file name.
    one_line = (
        '{"name": "one-line", "stages": [{"name": "run", "command": "true", '
        '"resources": {"vcores": 0.2, "memory": "32MiB"}}], "labels": {"x": "' + "y" * 300 + '"}}'
    )
    with pytest.raises(weft.WeftError) as e:
        client.submit(one_line)  # read as the spec: its unknown field is named
    assert e.value.code == "invalid_argument", e.value.message
    with pytest.raises(FileNotFoundError):
        client.submit(tmp_path / "missing.yaml")
    f = tmp_path / "ok.yaml"
    f.write_text(job("from-path", "true"))
    assert client.submit(f, wait=True, progress=False).status().state == "succeeded"


def test_a_wait_gives_up_at_its_timeout(client):
    nap = client.submit(job("nap2", "sleep 600"))
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        nap.wait(progress=False, timeout=1.5)
    assert time.monotonic() - t < 10
    nap.kill()


def test_no_leader_in_time_is_a_clear_error():
    with weft.Client("127.0.0.1:1", timeout=1) as c:
        with pytest.raises(weft.WeftError) as e:
            c.apps()
    assert e.value.code == "unavailable"
    assert "cannot reach a resource-manager leader at 127.0.0.1:1 within 1s" in e.value.message


SERVICE = """
name: web
kind: service
stages:
  - name: serve
    replicas: 1
    ports: [http]
    env: { VERSION: '@V@' }
    command: 'exec python3 -m http.server --bind 127.0.0.1 $WEFT_PORT_HTTP'
    resources: { vcores: 0.1, memory: 64MiB }
    health: { http: { port: http, path: / }, interval: 300ms, timeout: 250ms }
"""


def endpoints(app, n, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        eps = app.endpoints()
        if len(eps) == n:
            return eps
        assert time.monotonic() < deadline, f"not {n} endpoints: {eps}"
        time.sleep(0.1)


def test_a_service_lists_its_endpoints_scales_and_updates(client):
    import urllib.request

    app = client.submit(SERVICE.replace("@V@", "1"))
    (e,) = endpoints(app, 1)
    assert e.stage == "serve" and e.index == 0, e
    with urllib.request.urlopen(f"http://{e.address()}/", timeout=10) as r:
        assert r.status == 200
    assert app.status().kind == "service"
    assert app.scale(2) == 1
    eps = endpoints(app, 2)
    assert sorted(x.index for x in eps) == [0, 1]
    assert app.update(SERVICE.replace("@V@", "2")) == 1
    deadline = time.monotonic() + 60
    while app.status().rollout != "revision 1 rolled out":
        assert time.monotonic() < deadline, app.status().rollout
        time.sleep(0.2)
    after = endpoints(app, 1)
    assert not {x.container_id for x in after} & {x.container_id for x in eps}
    with pytest.raises(weft.WeftError) as bad:
        app.scale(2, stage="nope")
    assert "stage" in str(bad.value)
    app.kill()
    assert app.wait(progress=False, timeout=60).state == "killed"
