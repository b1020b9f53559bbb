"""The parent process (``smtpd: [priv]``): the only one that keeps root.

It binds the listening sockets, prepares the runtime directory, starts the five
children by re-executing the program, watches them through pidfds, and does the
privileged acts they ask for (local delivery as the target user).  A core child
that dies takes the daemon down with a log line naming it: systemd restarts the
service and the spool, being durable, loses nothing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from setproctitle import setproctitle

from common import aio, ipc, privsep
from common import log as logsetup
from common.ipc import Mesh
from common.messages import ConfEnd, CtlReply, CtlRequest, MdaDone, MdaFork, Msg, SetupDone
from smtpd import introspection, local_delivery
from smtpd.config import ConfigError, resolve_listener_addresses
from smtpd.main import CHILDREN, VERSION

log = logging.getLogger("smtpd")

SETUP_TIMEOUT = 30.0
STOP_GRACE = 3.0


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def make_rundir() -> Path:
    """A private directory for the channels: one sub-directory per pair, owned
    by the side that binds, group of the side that connects, setgid, mode 2750,
    so the two processes of a pair, and no one else, can reach its socket."""
    base = "/run" if privsep.privileged() and os.access("/run", os.W_OK) else tempfile.gettempdir()
    rundir = Path(tempfile.mkdtemp(prefix="smtpd.", dir=base))
    os.chmod(rundir, 0o711 if privsep.privileged() else 0o700)
    for a, b in ipc.PAIRS:
        d = ipc.pair_dir(rundir, a, b)
        d.mkdir(mode=0o700)
        if privsep.privileged():
            binder, connector = privsep.ids_for(a), privsep.ids_for(b)
            os.chown(d, binder.uid, connector.gid)
            os.chmod(d, 0o2750)
    return rundir


def bind_listeners(config) -> list[tuple[socket.socket, int]]:
    """Bind every listener as root (ports < 1024), to be inherited by pony."""
    out = []
    for index, listener in enumerate(config.listeners):
        if listener.address == "socket":
            continue
        for family, address in resolve_listener_addresses(listener):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, listener.port))
            except OSError as exc:
                sock.close()
                raise ConfigError(listener.file, listener.lineno,
                                  f"cannot listen on {address} port {listener.port}: {exc.strerror}")
            sock.listen(512)
            out.append((sock, index))
    return out


def child_argv(opts, name: str, rundir: Path, listen_fds: str) -> list[str]:
    argv = [sys.executable, "-m", "smtpd", "-f", opts.config, "--spool", opts.spool,
            "--socket", opts.socket, "-x", name, "--rundir", str(rundir),
            "--parent-pid", str(os.getpid())]
    for macro in opts.macros:
        argv += ["-D", macro]
    for trace in opts.trace:
        argv += ["-T", trace]
    for pause in opts.pause:
        argv += ["-P", pause]
    if opts.debug:
        argv.append("-d")
    argv += ["-v"] * opts.verbose
    if name == "pony":
        argv += ["--listen-fds", listen_fds]
    return argv


class Parent:
    def __init__(self, opts, config, rundir: Path, listeners) -> None:
        self.opts = opts
        self.config = config
        self.rundir = rundir
        self.listeners = listeners
        self.children: dict[str, subprocess.Popen] = {}
        self.ready: set[str] = set()
        self.all_ready = asyncio.Event()
        self.done = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self.mesh = Mesh("parent", rundir)
        self.deliveries: set[asyncio.Task] = set()
        self.delivery = local_delivery.DeliveryPool()

    def spawn(self) -> None:
        fds = [sock.fileno() for sock, _ in self.listeners]
        listen_fds = ",".join(f"{sock.fileno()}:{index}" for sock, index in self.listeners)
        loop = asyncio.get_running_loop()
        for name in CHILDREN:
            proc = subprocess.Popen(child_argv(self.opts, name, self.rundir, listen_fds),
                                    pass_fds=fds if name == "pony" else (), close_fds=True)
            self.children[name] = proc
            pidfd = os.pidfd_open(proc.pid)
            loop.add_reader(pidfd, self._child_exited, name, pidfd)

    def _child_exited(self, name: str, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        proc = self.children[name]
        status = proc.wait()
        if not self.stopping:
            cause = (f"terminated; signal {-status}" if status < 0 else f"exited {'okay' if status == 0 else 'abnormally'}")
            log.error("warn: lost child: %s %s", name, cause)
            self.shutdown(1)
        elif all(p.poll() is not None for p in self.children.values()):
            self.done.set()

    def shutdown(self, code: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = code
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if all(p.poll() is not None for p in self.children.values()):
            self.done.set()

    async def handle(self, peer: str, msg: Msg) -> None:
        if await introspection.handle(self.mesh, "parent", peer, msg):
            return
        if isinstance(msg, SetupDone):
            self.ready.add(msg.proc)
            if self.ready.issuperset(CHILDREN):
                self.all_ready.set()
        elif isinstance(msg, MdaFork):
            task = asyncio.create_task(self._deliver(msg))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)
        elif isinstance(msg, CtlRequest) and msg.command == "stop":
            await self.mesh.send(peer, CtlReply(reqid=msg.reqid, ok=True))
            log.info("smtpd: stop requested by control")
            # Give control a moment to answer smtpctl before it is told to stop.
            asyncio.get_running_loop().call_later(0.3, self.shutdown, 0)
        else:
            log.warning("warn: parent: unexpected %s from %s", type(msg).__name__, peer)

    async def _deliver(self, msg: MdaFork) -> None:
        status, error = await self.delivery.run(msg)
        await self.mesh.send("pony", MdaDone(reqid=msg.reqid, status=status, error=error))

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown, 0)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("smtpd: SIGHUP ignored (reload comes later)"))
        self.mesh.open()
        self.mesh.start(self.handle)
        self.spawn()
        ready_wait = asyncio.create_task(self.all_ready.wait())
        done_wait = asyncio.create_task(self.done.wait())
        finished, _ = await asyncio.wait({ready_wait, done_wait}, timeout=SETUP_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        if not finished:
            missing = sorted(set(CHILDREN) - self.ready)
            log.error("fatal: smtpd: children did not start in %ds: %s", SETUP_TIMEOUT, ", ".join(missing))
            self.shutdown(1)
        elif ready_wait in finished:
            for name in CHILDREN:
                await self.mesh.send(name, ConfEnd())
            log.info("info: pysmtpd %s ready: %s", VERSION,
                     ", ".join(f"{c}={p.pid}" for c, p in self.children.items()))
        ready_wait.cancel()
        await done_wait
        self.delivery.close()
        await self._reap()
        return self.exit_code

    async def _reap(self) -> None:
        deadline = loop_time() + STOP_GRACE
        while loop_time() < deadline and any(p.poll() is None for p in self.children.values()):
            await asyncio.sleep(0.05)
        for name, proc in self.children.items():
            if proc.poll() is None:
                log.error("warn: smtpd: %s did not stop in %ss, killing it", name, STOP_GRACE)
                proc.kill()
                proc.wait()
        for task in list(self.deliveries):
            task.cancel()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def run(opts, argv, config) -> int:
    if not (opts.debug or opts.foreground):
        _daemonize()
    setproctitle("smtpd: [priv]")
    logsetup.setup(foreground=opts.debug, verbose=bool(opts.verbose))
    introspection.apply_command_line(opts)
    try:
        if privsep.privileged():
            privsep.check_users()
        listeners = bind_listeners(config)
    except (privsep.PrivsepError, ConfigError) as exc:
        log.error("fatal: smtpd: %s", exc)
        return 1
    if _control_socket_alive(opts.socket):
        log.error("fatal: smtpd: control socket already listening: %s", opts.socket)
        return 1
    rundir = make_rundir()
    log.info("info: pysmtpd %s starting", VERSION)
    for note in config.not_applied:
        log.warning("warn: %s", note)
    try:
        code = aio.run(Parent(opts, config, rundir, listeners).main())
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
        try:
            os.unlink(opts.socket)
        except OSError:
            pass
    log.info("Exiting")
    return code


def _control_socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
