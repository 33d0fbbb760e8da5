"""A private Postfix instance and Postfix's load tools, used as the reference in bench_e2e.

Why Postfix: it is the MTA most operators measure others against, and its
``smtp-source`` / ``smtp-sink`` test tools (C, event driven) make a load generator
and a sink that cost almost nothing next to the MTA under test, so the same
generator and the same sink can drive both Postfix and our engine.

The instance is fully private: its own ``config_directory`` and ``queue_directory``
under ``benchmarks/out/postfix/``, listening on 127.0.0.1 on a free port only, with
``mydestination`` empty and every message relayed to ``[127.0.0.1]:<sink>``. It never
touches the system Postfix (which the Debian install leaves stopped) nor DNS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Debian package that ships postfix, smtp-source and smtp-sink.
PACKAGE = "postfix"


class PostfixUnavailable(RuntimeError):
    """Postfix (or its test tools) is not installed and cannot be installed here."""


def tools_available() -> bool:
    return all(shutil.which(t) for t in ("postfix", "smtp-source", "smtp-sink"))


def _system_postfix_running() -> bool:
    """The default instance (/etc/postfix) is running: its master.pid names a live process."""
    pidfile = Path("/var/spool/postfix/pid/master.pid")
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def ensure_installed(log: Path | None = None) -> None:
    """Install Debian's ``postfix`` when missing, without leaving a system Postfix running.

    debconf is told "No configuration" so no system instance is set up for mail, and if
    the package scripts started the default instance anyway (no policy-rc.d guard on
    this host), it is stopped again: only our private instance may listen.
    """
    if tools_available():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostfixUnavailable("postfix is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                       env=env, check=False, stdout=out, stderr=out, timeout=60)
        r = subprocess.run(["apt-get", "install", "-y", "-q", PACKAGE], env=env, stdout=out, stderr=out, timeout=600)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=out, stderr=out, timeout=600)
            r = subprocess.run(["apt-get", "install", "-y", "-q", PACKAGE], env=env, stdout=out, stderr=out, timeout=600)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if _system_postfix_running():
        subprocess.run(["postfix", "stop"], check=False, capture_output=True, timeout=60)
    if not tools_available():
        raise PostfixUnavailable(f"apt-get install {PACKAGE} did not provide postfix, smtp-source and smtp-sink")


def _main_cf(root: Path, port: int, sink_port: int, concurrency: int) -> str:
    """Relay everything to the sink; no local delivery, no DNS, no TLS, minimal logging to a file."""
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions =
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_destination_concurrency_limit = {concurrency}
smtp_destination_concurrency_limit = {concurrency}
relay_destination_concurrency_limit = {concurrency}
initial_destination_concurrency = {concurrency}
default_process_limit = 100
biff = no
notify_classes =
smtputf8_enable = no
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
"""


def _master_cf(port: int) -> str:
    """Only the services a relay needs, none chrooted (the queue is not under /var/spool)."""
    rows = [
        (f"127.0.0.1:{port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
        ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
        ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
        ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
        ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
        ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
        ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
        ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
        ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
        ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
        ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
        ("error", "unix", "-", "-", "n", "-", "-", "error"),
        ("retry", "unix", "-", "-", "n", "-", "-", "error"),
        ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
        ("local", "unix", "-", "n", "n", "-", "-", "local"),
        ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
        ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
        ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
    ]
    return "".join(" ".join(f"{c:<10}" for c in row).rstrip() + "\n" for row in rows)


def master_pid(root: Path) -> int | None:
    try:
        return int((root / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def private_postfix(root: Path, port: int, sink_port: int, concurrency: int = 20) -> Iterator[int]:
    """Start a private Postfix on 127.0.0.1:``port`` relaying to 127.0.0.1:``sink_port``; yield
    its master pid; stop it (and remove its queue) on exit."""
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    conf = root / "conf"
    conf.mkdir(parents=True)
    (conf / "main.cf").write_text(_main_cf(root, port, sink_port, concurrency))
    (conf / "master.cf").write_text(_master_cf(port))
    for sub in ("queue", "data"):
        (root / sub).mkdir()
    shutil.chown(root / "data", "postfix", "postfix")
    subprocess.run(["touch", str(root / "maillog")], check=True)
    log = open(root / "postfix-control.log", "ab")
    try:
        r = subprocess.run(["postfix", "-c", str(conf), "start"], stdout=log, stderr=log, timeout=60)
        if r.returncode != 0:
            raise PostfixUnavailable(f"postfix -c {conf} start failed, see {root}/postfix-control.log")
        deadline = time.monotonic() + 20
        pid = master_pid(root)
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.1)
            pid = master_pid(root)
        if pid is None:
            raise PostfixUnavailable(f"private postfix did not write its master.pid, see {root}/maillog")
        yield pid
    finally:
        subprocess.run(["postfix", "-c", str(conf), "stop"], stdout=log, stderr=log, timeout=60, check=False)
        log.close()


def smtp_source(host: str, port: int, messages: int, sessions: int, size: int,
                sender: str, recipient: str, *, reuse: bool = True) -> list[str]:
    """The ``smtp-source`` command line: ``sessions`` parallel connections, unique recipients
    (-N); with ``reuse`` each connection sends message after message (-d), without it every
    message opens a new connection (how most applications and libraries submit)."""
    return ["smtp-source", *(["-d"] if reuse else []), "-N", "-s", str(sessions), "-m", str(messages),
            "-l", str(size), "-f", sender, "-t", recipient, f"{host}:{port}"]
