"""``vm.metrics``: what one VM costs this host, read from ``/proc`` of its VMM process.

Guest RAM is one file mapping in the VMM: a VM that owns its RAM file (booted, restored) has all
of it private; a fork sibling maps its template's RAM copy-on-write, so of that mapping only the
pages it wrote ("Anonymous" in ``smaps``) are its own, and the rest (Rss minus Anonymous) are the
template's pages, the same physical memory in every sibling: ``shared_with`` names that file, so
a table of several VMs counts those bytes once per template.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..protocol.messages import VMMetrics

KIB = 1024


def vm_metrics(qemu_pid: int, ram_file: Path, ram_shared: bool, top_layer: Path) -> VMMetrics:
    """The metrics of the VM whose VMM is ``qemu_pid``, its RAM mapped from ``ram_file`` (its own
    if ``ram_shared``, else a fork template's) and its writes going to ``top_layer``."""
    rss_kib, pss_kib = _rollup(qemu_pid)
    ram_rss_kib, ram_anonymous_kib = _mapping(qemu_pid, ram_file)
    if ram_shared:  # its own RAM file: nothing of it is another VM's
        private_kib, shared_kib = ram_rss_kib, 0
    else:
        private_kib, shared_kib = ram_anonymous_kib, ram_rss_kib - ram_anonymous_kib
    return {
        "cpu_s": _cpu_seconds(qemu_pid),
        "qemu_rss_bytes": rss_kib * KIB,
        "qemu_pss_bytes": pss_kib * KIB,
        "guest_private_bytes": private_kib * KIB,
        "guest_shared_bytes": shared_kib * KIB,
        "shared_with": None if ram_shared else str(ram_file),
        "disk_bytes": _allocated(top_layer),
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (its ``stat``, fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields after the command, from the state (3rd)
    return round((utime + stime) / os.sysconf("SC_CLK_TCK"), 3)


def _rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of the whole process, in KiB."""
    totals = {"Rss:": 0, "Pss:": 0}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, *rest = line.split()
            if key in totals:
                totals[key] = int(rest[0])
    return totals["Rss:"], totals["Pss:"]


def _mapping(pid: int, file: Path) -> tuple[int, int]:
    """(Rss, Anonymous) in KiB of ``pid``'s mappings of ``file``, found by device and inode (a
    confined VMM may see the file under another path); (0, 0) if it maps none (a VMM of no RAM file)."""
    try:
        stat = os.stat(file)
    except FileNotFoundError:
        return 0, 0
    wanted = (f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}", str(stat.st_ino))
    rss = anonymous = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            words = line.split()
            if words and "-" in words[0] and ":" not in words[0]:  # a mapping's header: range perms offset dev inode
                inside = len(words) >= 5 and ((words[3], words[4]) == wanted or words[-1] == str(file))
            elif inside and words[0] == "Rss:":
                rss += int(words[1])
            elif inside and words[0] == "Anonymous:":
                anonymous += int(words[1])
    return rss, anonymous


def _allocated(path: Path) -> int:
    """Bytes the file takes on disk (its allocated blocks: a sparse layer's holes cost nothing)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
