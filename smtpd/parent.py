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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setproctitle import setproctitle

from common import aio, ipc, privsep
from common import log as logsetup
from common.ids import UidGenerator
from common.ipc import Mesh
from common.messages import (
    ConfEnd, ConfEndDone, CtlEnqueue, CtlReply, CtlRequest, FilterProcFork, FilterProcKill, LkaOpenForward,
    LkaOpenForwardReply, MdaMboxPrepare, MdaMboxPrepared, MdaWorkerExit, MdaWorkerExitReply,
    MdaWorkerKill, MdaWorkerSpawn, MdaWorkerSpawned, Msg, SetupDone, SmtpAuthenticate, SmtpAuthenticateReply,
    StatGet, StatReply, PonyEnqueueReply,
)
from smtpd import (
    auth, delivery_mbox, fd_channel, fdpass, filter_proc, forward, introspection, listeners, local_delivery,
    offline, proc_usage, sdnotify, spawn, tls,
)
from smtpd.config import ConfigError
from smtpd.main import CHILDREN, EXIT_CONFIG, VERSION, load_config
from smtpd.reload import Reloader
from smtpd.ttl_cache import TtlCache

log = logging.getLogger("smtpd")

SETUP_TIMEOUT = 30.0
EXECUTOR_THREADS = 2
LOCAL_HOME_SECONDS = 60.0     # a home's file system type is checked again after this
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
    base = tempfile.gettempdir()
    if privsep.privileged():
        # /run/smtpd: made by systemd-tmpfiles (systemd/smtpd.tmpfiles) where installed.
        base = next((d for d in ("/run/smtpd", "/run") if os.access(d, os.W_OK)), base)
    rundir = Path(tempfile.mkdtemp(prefix="smtpd.", dir=base))
    os.chmod(rundir, 0o711 if privsep.privileged() else 0o700)
    for a, b in ipc.PAIRS:
        d = ipc.pair_dir(rundir, a, b)
        d.mkdir(mode=0o700)
        if privsep.privileged():
            binder, connector = privsep.ids_for(a), privsep.ids_for(b)
            os.chown(d, binder.uid, connector.gid)
            os.chmod(d, 0o2750)
    if privsep.privileged():
        # pony's own, for the key copies it loads at a reload, chrooted here
        # (smtpd/tls.py _pem_path); unprivileged, pony is not chrooted and has /proc
        scratch = rundir / tls.SCRATCH_DIR_NAME
        scratch.mkdir(mode=0o700)
        pony = privsep.ids_for("pony")
        os.chown(scratch, pony.uid, pony.gid)
    return rundir


def child_args(opts, name: str, rundir: Path, listen_fds: str, fd_channel: int = -1,
               filter_channel: int = -1, queue_fd_channel: int = -1) -> list[str]:
    """The command line of a child (smtpd/spawn.py runs it in a fresh interpreter)."""
    argv = ["-f", opts.config, "--spool", opts.spool,
            "--socket", opts.socket, "-x", name, "--rundir", str(rundir),
            "--parent-pid", str(os.getpid()), "--syslog-socket", opts.syslog_socket]
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
        argv += ["--listen-fds", listen_fds, "--fd-channel", str(fd_channel)]
    elif name == "lka" and filter_channel >= 0:
        argv += ["--fd-channel", str(filter_channel)]
    if name in ("pony", "queue") and queue_fd_channel >= 0:
        # queue -> pony descriptors of messages for local delivery (smtpd/fd_channel.py)
        argv += ["--queue-fd-channel", str(queue_fd_channel)]
    return argv


def _read_failed(msg: LkaOpenForward) -> tuple[str, str]:
    """A .forward or :include: read that raised (called in its except clause): logged
    with its traceback, a temporary failure for lka."""
    log.exception("warn: smtpd: reading %s for lka failed", msg.path or f"{msg.home}/.forward")
    return "tempfail", ""


class Parent:
    def __init__(self, opts, config, rundir: Path, bound: list[listeners.Bound],
                 notifier: sdnotify.Notifier) -> None:
        self.opts = opts
        self.config = config
        self.enqueue_ids = UidGenerator()      # sendmail's messages (CtlEnqueue)
        self.rundir = rundir
        self.bound = bound
        self.notifier = notifier
        self.fd_channel, self.pony_fd_channel = fdpass.make_channel()
        # message descriptors: queue -> pony, and pony -> parent on the pair above
        # (docs/delivery.md); the parent's end of the latter is read here
        self.queue_pony_fds = fd_channel.make_pair()
        self.message_fds = fd_channel.FdReceiver(self.fd_channel)
        # filter processes' descriptors go to lka on a channel of their own (smtpd/filter_proc.py)
        self.filter_channel, self.lka_filter_channel = filter_proc.make_channel()
        self.filters = filter_proc.Spawner(config, self.filter_channel)
        self.reloader = Reloader(self, load_config)
        self.tasks: set[asyncio.Task] = set()
        self.children: dict[str, subprocess.Popen | spawn.Child] = {}
        self.ready: set[str] = set()
        self.all_ready = asyncio.Event()
        self.conf_done: set[str] = set()
        self.all_conf_done = asyncio.Event()
        self.done = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self.mesh = Mesh("parent", rundir)
        self.workers = local_delivery.WorkerProcesses()     # pony's delivery workers
        # homes found on a local disk file system: their .forward is read on the loop
        self.local_homes = TtlCache(LOCAL_HOME_SECONDS)
        ping_id = UidGenerator()
        self.watchdog = sdnotify.Watchdog(notifier, CHILDREN, lambda name, deadline: self.mesh.request(
            name, StatGet(reqid=ping_id()), (StatReply,), timeout=deadline))

    async def spawn(self) -> None:
        queue_end, pony_end = self.queue_pony_fds
        fds = [b.sock.fileno() for b in self.bound] + [self.pony_fd_channel.fileno(), pony_end.fileno()]
        listen_fds = ",".join(f"{b.sock.fileno()}:{b.index}" for b in self.bound)
        specs = []
        for name in CHILDREN:
            end = {"pony": pony_end, "queue": queue_end}.get(name)
            args = child_args(self.opts, name, self.rundir, listen_fds, self.pony_fd_channel.fileno(),
                              self.lka_filter_channel.fileno(), end.fileno() if end is not None else -1)
            passed = (fds if name == "pony" else [queue_end.fileno()] if name == "queue"
                      else [self.lka_filter_channel.fileno()] if name == "lka" else [])
            specs.append(spawn.ChildSpec(name, args, passed))
        if spawn.use_zygote():
            # blocking for the zygote's start (its imports): in a thread, the channels stay served
            self.children.update(await asyncio.to_thread(spawn.start_zygote, specs))
        else:
            self.children.update(spawn.start_exec(specs))
        loop = asyncio.get_running_loop()
        for name, proc in self.children.items():
            pidfd = os.pidfd_open(proc.pid)
            loop.add_reader(pidfd, self._child_exited, name, pidfd)
            if self.stopping:           # SIGTERM came while they were being started
                proc.send_signal(signal.SIGTERM)
        self.pony_fd_channel.close()          # pony has its end; a dead pony then reads as EOF
        self.lka_filter_channel.close()
        queue_end.close()
        pony_end.close()
        self.message_fds.start()

    def status_text(self) -> str:
        paused = " (smtp paused)" if "smtp" in self.opts.pause else ""
        return (f"pysmtpd {VERSION}: {len(self.children)} processes, "
                f"{len(self.bound)} listening socket(s){paused}")

    def spawn_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
        self.filters.stop()
        self.notifier.stopping("stopping")
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if all(p.poll() is not None for p in self.children.values()):
            self.done.set()

    async def handle(self, peer: str, msg: Msg) -> None:
        if await introspection.handle(self.mesh, "parent", peer, msg, processes=lambda: proc_usage.process_usage(
                {"parent": os.getpid(), **{name: proc.pid for name, proc in self.children.items()}})):
            return
        if isinstance(msg, SetupDone):
            self.ready.add(msg.proc)
            if self.ready.issuperset(CHILDREN):
                self.all_ready.set()
        elif isinstance(msg, ConfEndDone):
            self.conf_done.add(msg.proc)
            if self.conf_done.issuperset(CHILDREN):
                self.all_conf_done.set()
        elif isinstance(msg, SmtpAuthenticate) and peer == "lka":
            self.spawn_task(self._authenticate(msg))
        elif isinstance(msg, FilterProcFork) and peer == "lka":
            self.filters.fork(msg)
        elif isinstance(msg, FilterProcKill) and peer == "lka":
            self.filters.kill(msg)
        elif isinstance(msg, LkaOpenForward) and peer == "lka":
            if msg.kind == "forward" and self.local_homes.get(msg.home):
                # a home on a local disk: read here, no thread (smtpd/forward.py)
                status, text = self._read_forward_here(msg)
                await self.mesh.send("lka", LkaOpenForwardReply(reqid=msg.reqid, status=status, content=text))
            else:
                self.spawn_task(self._open_forward(msg))
        elif isinstance(msg, MdaWorkerSpawn) and peer == "pony":
            self.spawn_task(self._spawn_worker(msg))
        elif isinstance(msg, MdaWorkerKill) and peer == "pony":
            await self.workers.kill(msg.pid)
        elif isinstance(msg, MdaWorkerExit) and peer == "pony":
            self.spawn_task(self._worker_exit(msg))
        elif isinstance(msg, MdaMboxPrepare) and peer == "pony":
            await self.mesh.send("pony", self._prepare_mbox(msg))
        elif isinstance(msg, CtlRequest) and msg.command == "stop":
            await self.mesh.send(peer, CtlReply(reqid=msg.reqid, ok=True))
            log.info("smtpd: stop requested by control")
            # Give control a moment to answer smtpctl before it is told to stop.
            asyncio.get_running_loop().call_later(0.3, self.shutdown, 0)
        elif isinstance(msg, StatReply):
            pass            # an answer to the watchdog that came after its deadline
        elif isinstance(msg, CtlEnqueue) and peer == "control":
            # sendmail while the daemon runs (smtpd/offline.py): a task, as pony answers later
            self.spawn_task(self._enqueue_for(peer, msg))
        elif isinstance(msg, CtlRequest) and msg.command == "reload":
            # In a task: the reload talks to control too, whose channel this handler holds.
            self.spawn_task(self._reload_for(peer, msg.reqid))
        else:
            log.warning("warn: parent: unexpected %s from %s", type(msg).__name__, peer)

    async def _enqueue_for(self, peer: str, msg: CtlEnqueue) -> None:
        try:
            reply = await offline.enqueue_for_client(self.mesh, self.enqueue_ids, msg, self.config.hostname)
        except Exception:
            # a fault of ours: the user hears "try again" now rather than after control's timeout
            log.exception("warn: parent: enqueue for uid %d failed", msg.uid)
            reply = PonyEnqueueReply(reqid=msg.reqid, status="tempfail", text="451 4.3.0 Temporary failure")
        await self.mesh.send(peer, reply)

    async def _reload_for(self, peer: str, reqid: int) -> None:
        ok, text = await self.reloader.reload("smtpctl reload")
        await self.mesh.send(peer, CtlReply(reqid=reqid, ok=ok, text=text))

    def _sighup(self) -> None:
        if not self.all_conf_done.is_set() or self.stopping:
            log.warning("warn: smtpd: SIGHUP ignored: %s", "stopping" if self.stopping else "still starting")
            return
        self.spawn_task(self.reloader.reload("SIGHUP"))

    async def _authenticate(self, msg: SmtpAuthenticate) -> None:
        """AUTH against the system's accounts (a listener's auth without a table): only
        the parent can read the shadow file.  The answer goes back through lka."""
        result = await asyncio.to_thread(auth.authenticate_system, msg.user, msg.password)
        await self.mesh.send("lka", SmtpAuthenticateReply(reqid=msg.reqid, result=result))

    async def _open_forward(self, msg: LkaOpenForward) -> None:
        """A user's .forward or an :include: file for lka's expansion: only root can
        read every home (smtpd/forward.py has the checks).  In a thread: the home
        may be on NFS; the thread also learns whether it is on a local disk, where
        the next reads are done on the loop (``local_homes``)."""
        try:
            # run_in_executor: to_thread's copy of the context is not needed here
            loop = asyncio.get_running_loop()
            if msg.kind == "forward":
                status, text, local = await loop.run_in_executor(
                    None, forward.read_forward_learning_fs, msg.user, msg.home, msg.uid)
                if local:
                    self.local_homes.put(msg.home, True)
            else:
                status, text = await loop.run_in_executor(None, forward.read_include, msg.path)
        except Exception:
            status, text = _read_failed(msg)
        await self.mesh.send("lka", LkaOpenForwardReply(reqid=msg.reqid, status=status, content=text))

    def _read_forward_here(self, msg: LkaOpenForward) -> tuple[str, str]:
        try:
            return forward.read_forward(msg.user, msg.home, msg.uid)
        except Exception:
            return _read_failed(msg)

    async def _spawn_worker(self, msg: MdaWorkerSpawn) -> None:
        """A delivery worker for pony: it serves the socket pony sent just before and
        runs as the user (smtpd/local_delivery.py; docs/delivery.md)."""
        try:
            fd = await self.message_fds.take(msg.reqid, timeout=10.0)
        except TimeoutError:
            status, error, pid = "tempfail", "the worker's socket did not arrive", 0
        else:
            status, error, pid = await self._spawn_serving(fd, msg.uid, msg.gid)
        await self.mesh.send("pony", MdaWorkerSpawned(reqid=msg.reqid, status=status, error=error, pid=pid))

    async def _spawn_serving(self, fd: int, uid: int, gid: int) -> tuple[str, str, int]:
        """WorkerProcesses.spawn on the descriptor pony sent, which is closed here."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:                         # not even a socket
            os.close(fd)
            return "tempfail", "not a delivery socket", 0
        try:
            return await self.workers.spawn(uid, gid, sock)
        except OSError as exc:                  # fork or pidfd_open: out of processes
            log.warning("warn: smtpd: cannot start a delivery process: %s", exc)
            return "tempfail", f"cannot start a delivery process: {exc.strerror}", 0
        finally:
            sock.close()

    async def _worker_exit(self, msg: MdaWorkerExit) -> None:
        text = await self.workers.exit_text(msg.pid)
        await self.mesh.send("pony", MdaWorkerExitReply(reqid=msg.reqid, text=text))

    def _prepare_mbox(self, msg: MdaMboxPrepare) -> MdaMboxPrepared:
        """``<spool>/<user>`` made as root when missing, the spool from the action in
        the parent's own configuration: pony never names a file root creates."""
        refused = local_delivery.root_refused(msg.uid)
        if refused:
            return MdaMboxPrepared(reqid=msg.reqid, status="permfail", error=refused)
        action = self.config.actions.get(msg.action)
        spool = (action.target if action is not None and action.method == "mbox" and action.target
                 else delivery_mbox.MBOX_SPOOL)
        try:
            delivery_mbox.prepare_mailbox(spool, msg.username, msg.uid, msg.gid)
        except delivery_mbox.DeliveryFailure as exc:
            return MdaMboxPrepared(reqid=msg.reqid, status="tempfail" if exc.temporary else "permfail",
                                   error=exc.text)
        return MdaMboxPrepared(reqid=msg.reqid, status="ok", path=os.path.join(spool, msg.username))

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        # The threads run the blocking reads of ~/.forward and :include: files and the
        # system's password checks: two are plenty, and each costs a stack and a
        # malloc arena (the default pool grew to six under load).
        loop.set_default_executor(ThreadPoolExecutor(max_workers=EXECUTOR_THREADS))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown, 0)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self.mesh.open()
        self.mesh.start(self.handle)
        self.notifier.status("starting processes")
        try:
            await self.spawn()
        except spawn.SpawnError as exc:
            log.error("fatal: smtpd: %s", exc)
            return 1
        ready_wait = asyncio.create_task(self.all_ready.wait())
        done_wait = asyncio.create_task(self.done.wait())
        finished, _ = await asyncio.wait({ready_wait, done_wait}, timeout=SETUP_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        if not finished:
            missing = sorted(set(CHILDREN) - self.ready)
            log.error("fatal: smtpd: children did not start in %ds: %s", SETUP_TIMEOUT, ", ".join(missing))
            self.shutdown(1)
        elif ready_wait in finished:
            await self._configure(done_wait)
        ready_wait.cancel()
        await done_wait
        self.workers.close()
        self.message_fds.stop()
        await self._reap()
        return self.exit_code

    async def _configure(self, done_wait: asyncio.Task) -> None:
        """conf_end to every child, then READY=1 once each has applied it: pony's
        listeners then accept connections (systemd's readiness means "serving")."""
        self.notifier.status("configuring processes")
        for name in CHILDREN:
            await self.mesh.send(name, ConfEnd())
        conf_wait = asyncio.create_task(self.all_conf_done.wait())
        finished, _ = await asyncio.wait({conf_wait, done_wait}, timeout=SETUP_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        conf_wait.cancel()
        if conf_wait not in finished:
            if not self.stopping:
                missing = sorted(set(CHILDREN) - self.conf_done)
                log.error("fatal: smtpd: children did not configure in %ds: %s", SETUP_TIMEOUT,
                          ", ".join(missing))
                self.shutdown(1)
            return
        log.info("info: pysmtpd %s ready: %s", VERSION,
                 ", ".join(f"{c}={p.pid}" for c, p in self.children.items()))
        self.notifier.ready(self.status_text())
        self.spawn_task(self.watchdog.run())
        # offline/: what sendmail left while the daemon was down (smtpd/offline.py)
        self.spawn_task(offline.enqueue_all(self.mesh, UidGenerator(), self.opts.spool,
                                            self.config.hostname, self.config.max_message_size))

    async def _reap(self) -> None:
        deadline = loop_time() + STOP_GRACE
        while loop_time() < deadline and any(p.poll() is None for p in self.children.values()):
            await asyncio.sleep(0.05)
        for name, proc in self.children.items():
            if proc.poll() is None:
                log.error("warn: smtpd: %s did not stop in %ss, killing it", name, STOP_GRACE)
                proc.kill()
                proc.wait()
        for task in list(self.tasks):
            task.cancel()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def run(opts, argv, config) -> int:
    # Taken before daemonizing: LISTEN_PID names this process, and neither variable
    # must reach the children.
    notifier = sdnotify.take_notify_socket_from_environment()
    try:
        inherited = sdnotify.inherited_sockets()
    except sdnotify.ActivationError as exc:
        print(f"smtpd: socket activation: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not (opts.debug or opts.foreground):
        _daemonize()
    setproctitle("smtpd: [priv]")
    logsetup.setup(foreground=opts.debug, verbose=bool(opts.verbose), syslog_socket=opts.syslog_socket)
    introspection.apply_command_line(opts)
    try:
        if privsep.privileged():
            privsep.check_users()
    except privsep.PrivsepError as exc:
        log.error("fatal: smtpd: %s", exc)
        return 1
    try:
        auth.check_system_accounts(config, privsep.privileged())
    except ConfigError as exc:
        log.error("fatal: smtpd: %s", exc)
        return EXIT_CONFIG
    try:
        bound = listeners.initial(config, inherited)
    except (ConfigError, sdnotify.ActivationError) as exc:
        log.error("fatal: smtpd: %s", exc)
        notifier.notify(STATUS=f"cannot start: {exc}")
        return 1 if isinstance(exc, listeners.BindError) else EXIT_CONFIG
    if _control_socket_alive(opts.socket):
        log.error("fatal: smtpd: control socket already listening: %s", opts.socket)
        return 1
    rundir = make_rundir()
    log.info("info: pysmtpd %s starting", VERSION)
    if inherited:
        log.info("info: smtpd: %d listening socket(s) from systemd: %s", len(inherited),
                 ", ".join(listeners.key_text(b.key) for b in bound if b.inherited))
    for note in config.not_applied:
        log.warning("warn: %s", note)
    try:
        code = aio.run(Parent(opts, config, rundir, bound, notifier).main())
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
