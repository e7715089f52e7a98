"""The client: any subset of the members' addresses, the leader found and
followed (a NotLeader answer names it), retryable errors retried with
jittered backoff until a deadline, as the Rust client and rmctl do."""

from __future__ import annotations

import os
import pathlib
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import grpc

from weft.v1 import client_pb2 as pb
from weft.v1 import client_pb2_grpc as rpc

#: gRPC metadata key carrying the leader's address on NotLeader answers.
LEADER_HEADER = "weft-leader"
#: Codes worth another try (an election, a member restarting).
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
#: The server name of every member's certificate (`rmctl tls cert create --role rm`).
RM_SERVER_NAME = "rm.weft"

_STATES = {
    pb.APPLICATION_STATE_SUBMITTED: "submitted",
    pb.APPLICATION_STATE_ACCEPTED: "accepted",
    pb.APPLICATION_STATE_RUNNING: "running",
    pb.APPLICATION_STATE_SUCCEEDED: "succeeded",
    pb.APPLICATION_STATE_FAILED: "failed",
    pb.APPLICATION_STATE_KILLED: "killed",
}
_BY_NAME = {v: k for k, v in _STATES.items()}
FINISHED = ("succeeded", "failed", "killed")


class WeftError(Exception):
    """The resource manager refused a call, or no leader answered in time.

    `code` is the gRPC status code's name in lower case (`invalid_argument`,
    `not_found`, `permission_denied`, `unauthenticated`, `unavailable`...);
    `field` the input field the message names, where it names one."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
        head = message.split(": ", 1)[0] if ": " in message else ""
        self.field = head if head and all(c.isalnum() or c in "_.[]-" for c in head) else None


@dataclass
class Stage:
    name: str
    done: int
    total: int
    running: int
    failed: int


@dataclass
class Report:
    """An application as the resource manager reports it."""

    id: str
    name: str
    queue: str
    user: str
    state: str
    attempt: int
    progress: float
    stages: List[Stage]
    diagnostics: str
    submitted_at_ms: int
    finished_at_ms: Optional[int]
    kind: str = "batch"
    endpoints: List["Endpoint"] = field(default_factory=list)
    spec_revision: int = 0
    rollout: str = ""
    # Its containers preempted so far (each requeued, no retry used).
    preempted: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @classmethod
    def of(cls, r) -> "Report":
        return cls(
            id=r.application_id,
            name=r.name,
            queue=r.queue,
            user=r.user,
            state=_STATES.get(r.state, "submitted"),
            attempt=r.attempt,
            progress=r.progress,
            stages=[Stage(s.name, s.done, s.total, s.running, s.failed) for s in r.stages],
            diagnostics=r.diagnostics,
            submitted_at_ms=r.submitted_at_ms,
            finished_at_ms=r.finished_at_ms or None,
            kind=r.kind or "batch",
            endpoints=[Endpoint.of(e) for e in r.endpoints],
            spec_revision=r.spec_revision,
            rollout=r.rollout,
            preempted=r.preempted,
        )


@dataclass
class Endpoint:
    """A service's healthy replica: where to reach it."""

    stage: str
    index: int
    container_id: str
    node_id: str
    host: str
    ports: dict

    def address(self, port: Optional[str] = None) -> str:
        """`host:port` of the named port (default: the only, or first, one)."""
        name = port or sorted(self.ports)[0]
        return f"{self.host}:{self.ports[name]}"

    @classmethod
    def of(cls, e) -> "Endpoint":
        return cls(e.stage, e.index, e.container_id, e.node_id, e.host, dict(e.ports))


@dataclass
class Why:
    """What keeps an application waiting, or why it failed."""

    state: str
    summary: str
    waiting: List[dict] = field(default_factory=list)
    failure: Optional[dict] = None


class Client:
    """A client of one Weft cluster.

    `addresses`: members' gRPC addresses (`host:port`, a list or a
    comma-separated string; default `$WEFT_RM` or 127.0.0.1:7100). `token`:
    a user's token (default `$WEFT_TOKEN`). `ca`, `cert`, `key`: PEM files for
    mutual TLS (default `$WEFT_TLS_CA`, `$WEFT_TLS_CERT`, `$WEFT_TLS_KEY`).
    `timeout`: how long a call looks for a leader before it gives up."""

    def __init__(
        self,
        addresses: Union[str, Sequence[str], None] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        timeout: float = 30.0,
    ):
        if addresses is None:
            addresses = os.environ.get("WEFT_RM", "127.0.0.1:7100")
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",")]
        self.addresses = [a for a in addresses if a]
        if not self.addresses:
            raise ValueError("addresses: give at least one member's host:port")
        token = token if token is not None else os.environ.get("WEFT_TOKEN")
        self._metadata = [("authorization", f"Bearer {token.strip()}")] if token else []
        ca = ca or os.environ.get("WEFT_TLS_CA")
        cert = cert or os.environ.get("WEFT_TLS_CERT")
        key = key or os.environ.get("WEFT_TLS_KEY")
        if (cert or key) and not ca:
            raise ValueError("ca: required with cert and key")
        if bool(cert) != bool(key):
            raise ValueError("cert, key: give both or neither")
        self._creds = None
        if ca:
            read = lambda p: pathlib.Path(p).read_bytes() if p else None  # noqa: E731
            self._creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
        self.timeout = timeout
        self._channels = {}
        self._leader: Optional[str] = None

    # -- the leader loop --------------------------------------------------

    def _stub(self, address: str) -> rpc.ClientServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            if self._creds is not None:
                ch = grpc.secure_channel(
                    address, self._creds, options=[("grpc.ssl_target_name_override", RM_SERVER_NAME)]
                )
            else:
                ch = grpc.insecure_channel(address)
            self._channels[address] = ch
        return rpc.ClientServiceStub(ch)

    def _call(self, method: str, request, stream: bool = False, stream_timeout: Optional[float] = None):
        """`method` on the leader, following NotLeader answers and retrying
        retryable errors until `timeout` (each try of a unary call at most
        10 s, so that one frozen member does not take all of it)."""
        deadline = time.monotonic() + self.timeout
        order = ([self._leader] if self._leader else []) + [a for a in self.addresses if a != self._leader]
        i, wait, last = 0, 0.05, "no answer"
        while True:
            address = order[i % len(order)]
            try:
                call = getattr(self._stub(address), method)
                if stream:
                    it = call(request, metadata=self._metadata, timeout=stream_timeout)
                    first = next(it, None)  # errors of the call itself surface here
                    self._leader = address
                    return _chain(first, it)
                left = min(max(deadline - time.monotonic(), 0.5), 10.0)
                r = call(request, metadata=self._metadata, timeout=left)
                self._leader = address
                return r
            except grpc.RpcError as e:
                code = e.code()
                if code not in RETRYABLE:
                    raise WeftError(code.name.lower(), e.details() or code.name) from None
                last = f"{address}: {e.details()}"
                hint = dict(e.trailing_metadata() or ()).get(LEADER_HEADER)
                if hint and hint not in order:
                    order.append(hint)
                if hint:
                    i = order.index(hint)
                else:
                    i += 1
                    self._leader = None
            if time.monotonic() >= deadline:
                raise WeftError(
                    "unavailable",
                    f"cannot reach a resource-manager leader at {','.join(self.addresses)} "
                    f"within {self.timeout:g}s: {last}",
                )
            time.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, 1.0)

    # -- applications -----------------------------------------------------

    @staticmethod
    def _spec(spec: Union[str, os.PathLike], format: Optional[str]):
        """A spec's text and format: YAML or TOML text, or the path of a
        file (`.toml` read as TOML)."""
        path = None
        if isinstance(spec, os.PathLike):
            path = pathlib.Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"spec: no file {path}")
        elif "\n" not in spec and len(spec) < 4096:
            try:
                if os.path.isfile(spec):
                    path = pathlib.Path(spec)
            except (OSError, ValueError):  # a one-line spec, not a path
                path = None
        text = spec if path is None else path.read_text()
        if path is not None:
            format = format or ("toml" if path.suffix == ".toml" else "yaml")
        return text, format or "yaml"

    def submit(
        self,
        spec: Union[str, os.PathLike],
        wait: bool = False,
        user: str = "",
        format: Optional[str] = None,
        progress: bool = True,
    ) -> "Application":
        """Submits a job spec: YAML or TOML text, or the path of a file
        (`.toml` read as TOML). `wait`: wait for its end (see
        `Application.wait`). The request carries an id of its own, so a
        retry after a lost answer submits it once."""
        text, format = self._spec(spec, format)
        req = pb.SubmitApplicationRequest(
            spec=text,
            spec_format=format,
            user=user,
            request_id=f"py-{uuid.uuid4().hex}",
        )
        app = Application(self, self._call("SubmitApplication", req).application_id)
        if wait:
            app.wait(progress=progress)
        return app

    def app(self, app_id: str) -> "Application":
        """The application `app_id` (checked to exist)."""
        a = Application(self, app_id)
        a.status()
        return a

    def apps(
        self,
        state: Union[str, Sequence[str], None] = None,
        user: str = "",
        queue: str = "",
        name: str = "",
    ) -> List[Report]:
        """Applications, oldest first; the filters combine. `state`: one
        name or several (submitted, accepted, running, succeeded, failed,
        killed)."""
        states = [state] if isinstance(state, str) else list(state or [])
        bad = [s for s in states if s not in _BY_NAME]
        if bad:
            raise ValueError(f"state: {bad[0]!r} is not one of {', '.join(_BY_NAME)}")
        out, token = [], ""
        while True:
            r = self._call(
                "ListApplications",
                pb.ListApplicationsRequest(
                    queue=queue,
                    user=user,
                    name=name,
                    states=[_BY_NAME[s] for s in states],
                    page_token=token,
                ),
            )
            out.extend(Report.of(a) for a in r.applications)
            token = r.next_page_token
            if not token:
                return out

    # -- the cluster ------------------------------------------------------

    def nodes(self) -> List[dict]:
        """The nodes: id, address, state, capacity, use, containers."""
        r = self._call("ListNodes", pb.ListNodesRequest())
        return [
            {
                "id": n.node_id,
                "address": n.address,
                "state": pb.NodeState.Name(n.state)[len("NODE_STATE_") :].lower(),
                "vcores": n.capacity.vcores_milli / 1000,
                "memory_bytes": n.capacity.memory_bytes,
                "gpus": len(n.capacity.gpus),
                "used_vcores": n.used.vcores_milli / 1000,
                "used_memory_bytes": n.used.memory_bytes,
                "containers": n.containers,
                "labels": dict(n.labels),
            }
            for n in r.nodes
        ]

    def queues(self) -> List[dict]:
        """The queues: guarantees, maxima, use, applications."""
        r = self._call("ListQueues", pb.ListQueuesRequest())
        res = lambda x: {  # noqa: E731
            "vcores": x.vcores_milli / 1000,
            "memory_bytes": x.memory_bytes,
            "gpus": x.gpus,
        }
        return [
            {
                "name": q.name,
                "guaranteed": res(q.guaranteed),
                "maximum": res(q.maximum),
                "used": res(q.used),
                "pending": q.pending_applications,
                "running": q.running_applications,
            }
            for q in r.queues
        ]

    def cluster(self) -> dict:
        """The RM group: members, leader, term, nodes."""
        r = self._call("ClusterStatus", pb.ClusterStatusRequest())
        return {
            "leader_id": r.leader_id,
            "term": r.term,
            "nodes": r.nodes,
            "members": [
                {"id": m.id, "address": m.address, "leader": m.is_leader, "http_url": m.http_url or None}
                for m in r.members
            ],
        }

    def whoami(self) -> dict:
        r = self._call("WhoAmI", pb.WhoAmIRequest())
        return {"user": r.user, "admin": r.admin, "method": r.method}

    def close(self):
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _chain(first, rest):
    """The first reply, then the rest; a caller that stops early (a
    follow left) ends the call rather than leave it to the collector."""
    try:
        if first is not None:
            yield first
        yield from rest
    finally:
        cancel = getattr(rest, "cancel", None)
        if cancel is not None:
            cancel()


class Application:
    """One application of a cluster."""

    def __init__(self, client: Client, app_id: str):
        self.client = client
        self.id = app_id

    def __repr__(self):
        return f"Application({self.id!r})"

    def status(self) -> Report:
        return Report.of(
            self.client._call("GetApplication", pb.GetApplicationRequest(application_id=self.id))
        )

    def wait(self, progress: bool = True, timeout: Optional[float] = None) -> Report:
        """Waits for its end and returns it (whatever the end: check
        `.state`). `progress`: a bar per stage (tqdm when installed, lines
        on stderr otherwise). `timeout`: raise TimeoutError after this long."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bars = _Progress(progress)
        try:
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.1)
                try:
                    for r in self.client._call(
                        "WatchApplication",
                        pb.GetApplicationRequest(application_id=self.id),
                        stream=True,
                        stream_timeout=left,
                    ):
                        rep = Report.of(r)
                        bars.show(rep)
                        if rep.finished:
                            return rep
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError(f"{self.id} still {rep.state} after {timeout}s")
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                        raise TimeoutError(f"{self.id} did not finish within {timeout}s") from None
                    # A stream cut by a failover: watch again from the leader.
                    if e.code() not in RETRYABLE:
                        raise WeftError(e.code().name.lower(), e.details() or "") from None
                    self.client._leader = None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.id} did not finish within {timeout}s")
                time.sleep(0.2)
        finally:
            bars.close()

    def logs(
        self, task: str = "", follow: bool = False, stderr: bool = False
    ) -> Union[str, Iterator[str]]:
        """A task's output (`stage/index`, or a container id; none: the
        master's). `follow`: an iterator of pieces as the task writes
        them, until it ends; otherwise the text so far."""
        req = pb.GetTaskLogsRequest(application_id=self.id, task=task, stderr=stderr, follow=follow)
        chunks = self.client._call("GetTaskLogs", req, stream=True)

        def text():
            try:
                for c in chunks:
                    yield c.data.decode("utf-8", "replace")
            except grpc.RpcError as e:
                raise WeftError(e.code().name.lower(), e.details() or "") from None

        return text() if follow else "".join(text())

    def kill(self) -> None:
        self.client._call("KillApplication", pb.KillApplicationRequest(application_id=self.id))

    def endpoints(self) -> List[Endpoint]:
        """A service's healthy replicas (`rmctl app endpoints`)."""
        return self.status().endpoints

    def scale(self, replicas: int, stage: str = "") -> int:
        """Sets how many replicas a service's stage keeps (`stage`: needed
        where it has several); returns the count before."""
        r = self.client._call(
            "ScaleApplication",
            pb.ScaleApplicationRequest(application_id=self.id, stage=stage, replicas=replicas),
        )
        return r.previous

    def update(self, spec: str, spec_format: Optional[str] = None) -> int:
        """Replaces a running service's spec (text or a path, as for
        `Client.submit`); its master rolls it out one replica at a time.
        Returns the new spec revision."""
        text, fmt = self.client._spec(spec, spec_format)
        r = self.client._call(
            "UpdateApplication",
            pb.UpdateApplicationRequest(application_id=self.id, spec=text, spec_format=fmt),
        )
        return r.spec_revision

    def why(self) -> Why:
        """What keeps each waiting part from running now, or the task it
        failed on (`rmctl why`)."""
        x = self.client._call("ExplainApplication", pb.GetApplicationRequest(application_id=self.id))
        return Why(
            state=_STATES.get(x.state, "submitted"),
            summary=x.summary,
            waiting=[
                {"what": w.what, "tasks": w.tasks, "reason": w.reason, "detail": w.detail, "ahead": w.ahead}
                for w in x.waiting
            ],
            failure=(
                {
                    "task": x.failure.task,
                    "node_id": x.failure.node_id,
                    "reason": x.failure.reason,
                    "diagnostic": x.failure.diagnostic,
                    "exit_status": x.failure.exit_status,
                }
                if x.HasField("failure")
                else None
            ),
        )


class _Progress:
    """A bar per stage: tqdm where installed (notebooks too), lines on
    stderr otherwise; nothing when off."""

    def __init__(self, on: bool):
        self.on = on
        self.bars = {}
        self.last = None
        try:
            from tqdm.auto import tqdm  # type: ignore

            self.tqdm = tqdm
        except ImportError:
            self.tqdm = None

    def show(self, r: Report):
        if not self.on:
            return
        if self.tqdm is None:
            line = f"{r.id} {r.state} " + " ".join(f"{s.name} {s.done}/{s.total}" for s in r.stages)
            if line != self.last:
                print(line, file=sys.stderr)
                self.last = line
            return
        for s in r.stages:
            bar = self.bars.get(s.name)
            if bar is None:
                bar = self.bars[s.name] = self.tqdm(total=s.total, desc=s.name, unit="task")
            bar.total = s.total
            bar.n = s.done
            bar.set_postfix(running=s.running, failed=s.failed)
            bar.refresh()

    def close(self):
        for b in self.bars.values():
            b.close()
