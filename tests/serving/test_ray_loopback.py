"""A local Ray started by `rnnserve score --engine ray` listens on loopback only: every listening TCP
socket of the scoring process and the processes it starts (GCS, raylet, agents, workers) is read from
/proc while it scores, and its predictions equal the local engine's."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is in the dev extra; the [ray] extra installs it for users")

ROOT = Path(__file__).resolve().parents[2]
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp*


def _listening_sockets() -> dict[str, str]:
    """inode -> "address:port" of every listening TCP socket on this machine (IPv4 and IPv6)."""
    sockets = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != LISTEN:
                    continue
                hex_address, hex_port = local.split(":")
                raw = bytes.fromhex(hex_address)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                address = ipaddress.ip_address(raw)
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                sockets[inode] = f"{address}:{int(hex_port, 16)}"
    return sockets


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _socket_inodes(pid: int) -> dict[str, str]:
    """socket inode -> the process name, for each socket the process holds open."""
    inodes = {}
    try:
        with open(f"/proc/{pid}/comm") as handle:
            name = handle.read().strip()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes[target[8:-1]] = name
    except OSError:  # the process ended, or a descriptor closed, while we looked
        pass
    return inodes


def _probabilities(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["id"] for r in rows], np.array([list(r["probabilities"].values()) for r in rows])


def test_local_ray_listens_on_loopback_only(tmp_path):
    words = "what a wonderful flight my bags were lost again thanks crew late".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 6)) for _ in range(3000)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    command = [sys.executable, "-m", "serving", "score", "--model", "sentiment", "--models", str(ROOT / "models"),
               "--input", str(tmp_path / "texts.txt"), "--probabilities", "--quiet", "--batch-size", "64"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's shell, no Ray settings
    ray_run = subprocess.Popen([*command, "--engine", "ray", "--output", str(tmp_path / "ray.jsonl")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listeners: dict[str, set[str]] = {}  # "address:port" -> names of the processes that listen there
    deadline = time.monotonic() + 240
    while ray_run.poll() is None and time.monotonic() < deadline:
        owned = {}
        for pid in _descendants(ray_run.pid):
            owned.update(_socket_inodes(pid))
        for inode, where in _listening_sockets().items():
            if inode in owned:
                listeners.setdefault(where, set()).add(owned[inode])
        time.sleep(0.2)
    output = ray_run.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    assert ray_run.returncode == 0, output
    names = set().union(*listeners.values()) if listeners else set()
    # Ray's own servers were seen listening, so the check looked at a running instance.
    assert {"gcs_server", "raylet"} <= names, listeners
    exposed = {where: sorted(who) for where, who in listeners.items()
               if not ipaddress.ip_address(where.rsplit(":", 1)[0].strip("[]")).is_loopback}
    assert not exposed, f"listening beyond loopback: {exposed}"

    subprocess.run([*command, "--output", str(tmp_path / "local.jsonl")], check=True, timeout=120)
    ray_ids, on_ray = _probabilities(tmp_path / "ray.jsonl")
    local_ids, local = _probabilities(tmp_path / "local.jsonl")
    assert ray_ids == local_ids and len(ray_ids) == len(texts)
    np.testing.assert_allclose(on_ray, local, atol=1e-5)
