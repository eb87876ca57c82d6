"""Throwaway network namespaces for the firewall tests; removed with everything started in them."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


class Namespaces:
    """Create namespaces named PREFIX-NAME and the processes in them; close() removes all."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.names = []
        self.processes = []

    def add(self, short):
        name = f"{self.prefix}-{short}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.names.append(name)
        self.ip(name, "link set lo up")
        return name

    def ip(self, namespace, command):
        subprocess.run(["ip", "-n", namespace, *command.split()], check=True)

    def run(self, namespace, *argv, check=True, timeout=30):
        return subprocess.run(
            ["ip", "netns", "exec", namespace, *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def spawn(self, namespace, *argv, log_path):
        log = open(log_path, "w", encoding="utf-8")  # closed when the process ends
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes.append((process, log))
        return process

    def spawn_stub(self, namespace, answer, log_path, *listen):
        output = pathlib.Path(str(log_path) + ".out")
        process = self.spawn(
            namespace,
            sys.executable,
            str(HERE / "dns_stub.py"),
            "--answer",
            answer,
            "--log",
            str(log_path),
            *listen,
            log_path=output,
        )
        wait_for(lambda: "ready" in output.read_text(), f"DNS stub in {namespace}", process)
        return process

    def query(self, namespace, server, port, name, tcp=False, timeout=2.0, record_type="A"):
        argv = [sys.executable, str(HERE / "dns_query.py"), "--timeout", str(timeout), "--type", record_type]
        if tcp:
            argv.append("--tcp")
        result = self.run(namespace, *argv, server, str(port), name, check=False)
        if result.returncode != 0:
            raise AssertionError(f"dns_query.py failed in {namespace}: {result.stderr}")
        return json.loads(result.stdout)

    def counter(self, namespace, name):
        output = self.run(namespace, "nft", "list", "counter", "inet", "sysdns", name).stdout
        return int(re.search(r"packets (\d+)", output).group(1))

    def close(self):
        for process, log in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
            log.close()
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], check=False)


def wait_for(condition, what, process=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}")
        try:
            if condition():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} not ready after {timeout} s")


def prefix():
    return f"sdu{os.getpid() % 100000}"


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="ascii") as log:
        return [json.loads(line) for line in log if line.strip()]
