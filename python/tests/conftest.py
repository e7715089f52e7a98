"""A real standalone Weft cluster (one `resource-manager standalone
--local-agent` process on loopback) for the client's tests."""

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def binary(name: str) -> pathlib.Path:
    d = os.environ.get("WEFT_BIN_DIR")
    if d:
        return pathlib.Path(d) / name
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_containers(parent: str):
    """Kills what the agent started under `parent` and removes its cgroups
    (a test that failed midway leaves nothing behind)."""
    marker = f"WEFT_CONTAINER_SCOPE={parent}/".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if any(kv.startswith(marker) for kv in env.split(b"\0")):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    roots = []
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
            roots.append(pathlib.Path(parts[1]))
    deadline = time.monotonic() + 5
    while True:
        left = False
        for root in roots:
            d = root / parent
            if d.is_dir():
                for sub in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
                    if sub.is_dir():
                        try:
                            sub.rmdir()
                        except OSError:
                            pass
                try:
                    d.rmdir()
                except OSError:
                    left = True
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.1)


class Standalone:
    def __init__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="weft-py-")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.parent = f"weft-py-test-{os.getpid()}-{port}"
        d = pathlib.Path(self.dir.name)
        (d / "agent.toml").write_text(
            f'node_id = "py"\nwork_dir = "{d / "agent"}"\n'
            '[resources]\nvcores = 4.0\nmemory = "4GiB"\n'
            f'[containers]\ncgroup_parent = "{self.parent}"\n[gpu]\nprobe = "none"\n'
        )
        rm = binary("resource-manager")
        if not rm.exists():
            pytest.fail(f"{rm} is missing: run `cargo build --workspace --bins` first (or set WEFT_BIN_DIR)")
        self.log = open(d / "standalone.log", "ab")
        self.proc = subprocess.Popen(
            [str(rm), "standalone", "--data-dir", str(d), "--listen", self.address,
             "--local-agent", "--agent-config", str(d / "agent.toml")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env={**os.environ, "RUST_LOG": "info,raft=warn"},
        )

    def log_text(self) -> str:
        return (pathlib.Path(self.dir.name) / "standalone.log").read_text(errors="replace")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        _kill_containers(self.parent)
        self.dir.cleanup()


@pytest.fixture(scope="module")
def cluster():
    c = Standalone()
    try:
        yield c
    finally:
        c.stop()
