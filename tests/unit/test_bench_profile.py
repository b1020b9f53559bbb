"""bench/bench_profile.py's pure parts: py-spy's raw format, process labels, the
activity classifier and the per-message summary.  Fixtures are lines in py-spy's
format as it writes them for the daemon (a child's command line holds ';' and '"')."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_profile.py"
_spec = importlib.util.spec_from_file_location("bench_profile", _PATH)
bp = importlib.util.module_from_spec(_spec)
sys.modules["bench_profile"] = bp          # dataclasses resolve their module by name
_spec.loader.exec_module(bp)

PARENT = 'process 100:"smtpd: [priv]"'
CHILD_CMD = ("/venv/bin/python -I -c import os, sys; root = '/r'; spec = x.find_spec('smtpd'); "
             'ours = spec is not None; print("a;b"); from smtpd.main import main; main() '
             "-f /t/smtpd.conf -x queue --rundir /run/x --parent-pid 100 -d")
CHILD = f'process 101:"{CHILD_CMD}"'
QUEUE_SYNC = (f"{PARENT};{CHILD};Thread._bootstrap (threading.py:1030);Committer._run (smtpd/queue.py:100);"
              "Spool.commit_batch (smtpd/queue_fs.py:216);Spool.sync (smtpd/queue_fs.py:238) 167\n")
SOURCES = {("smtpd/queue_fs.py", 238): "            if _syncfs(self._sync_fd) != 0:",
           ("smtpd/queue_fs.py", 216): "            self.sync([self.incoming / name for name in staged])",
           ("smtpd/maildir.py", 408): "        os.fsync(fd)",
           ("smtpd/maildir.py", 388): "        os.write(fd, chunk)",
           ("smtpd/local_delivery.py", 144): "        pid = os.fork()",
           ("smtpd/smtp_session.py", 120): '        text = line.replace("\\r", "")'}


def source(file: str, line: int) -> str:
    return SOURCES.get((file, line), "")


def F(text: str) -> bp.Frame:
    return bp.parse_frame(text)


def frames(*texts: str) -> tuple:
    return tuple(F(t) for t in texts)


# --------------------------------------------------------------------------- raw format

def test_a_child_stack_keeps_its_command_line_whole():
    stack = bp.parse_raw_line(QUEUE_SYNC)
    assert stack.count == 167
    assert stack.processes == ((100, "smtpd: [priv]"), (101, CHILD_CMD))
    assert [f.function for f in stack.frames] == ["Thread._bootstrap", "Committer._run",
                                                  "Spool.commit_batch", "Spool.sync"]
    assert stack.frames[-1] == bp.Frame("Spool.sync", "smtpd/queue_fs.py", 238)


def test_stacks_without_python_frames_and_of_the_parent_itself():
    assert bp.parse_raw_line(f"{PARENT};{CHILD} 10").processes[-1] == (101, CHILD_CMD)
    assert bp.parse_raw_line(f"{PARENT};{CHILD} 10").frames == ()
    parent = bp.parse_raw_line(f"{PARENT};Runner.run (asyncio/runners.py:118) 350")
    assert parent.processes == ((100, "smtpd: [priv]"),) and parent.count == 350
    assert parent.frames == (bp.Frame("Runner.run", "asyncio/runners.py", 118),)


def test_frame_forms():
    assert F("_find_and_load (<frozen importlib._bootstrap>:1360)") == \
        bp.Frame("_find_and_load", "<frozen importlib._bootstrap>", 1360)
    assert F("_serve.<locals>.handle (smtpd/proc.py:115)") == bp.Frame("_serve.<locals>.handle", "smtpd/proc.py", 115)
    assert F("Mesh.send (common/ipc.py)") == bp.Frame("Mesh.send", "common/ipc.py", 0)     # --nolineno
    assert F("weird") == bp.Frame("weird", "", 0)


def test_blank_and_malformed_lines_are_skipped():
    assert bp.parse_raw(["\n", "no count here\n", QUEUE_SYNC]) == [bp.parse_raw_line(QUEUE_SYNC)]


# --------------------------------------------------------------------------- processes

@pytest.mark.parametrize("processes, label", [
    (((100, "smtpd: [priv]"),), "priv"),
    (((100, "/venv/bin/python -m smtpd -d -f x"),), "priv"),          # attached before setproctitle
    (((100, "smtpd: [priv]"), (101, CHILD_CMD)), "queue"),
    (((100, "smtpd: [priv]"), (102, "smtpd: [priv]")), bp.WORKER),     # a fork of the parent
    (((100, "python -m smtpd -d"), (102, "python -m smtpd -d")), "child seen before its exec"),
    (((100, "smtpd: [priv]"), (103, "smtpd: lka")), "lka"),
    (((100, "smtpd: [priv]"), (101, CHILD_CMD), (104, "/usr/bin/perl filter.pl")), "other: perl"),
    (((100, "smtpd: [priv]"), (106, "python -I -c from smtpd.zygote import serve; serve() "
                                   '{"children": [{"argv": ["-x", "lka"]}]} 7')), "zygote"),
    ((), "unknown"),
])
def test_process_labels(processes, label):
    assert bp.process_label(processes) == label


def test_titles_bench_mail_reports_cpu_under():
    assert bp.title_of("priv") == bp.title_of(bp.WORKER) == "smtpd: [priv]"
    assert bp.title_of("queue") == "smtpd: queue"
    assert bp.title_of("other: perl") == "other: perl"


def test_a_process_without_a_title_of_its_own_gets_its_cpu_from_schedstat():
    raw = [f'{PARENT};process 106:"python -I -c from smtpd.zygote import serve";'
           "_find_and_load (<frozen importlib._bootstrap>:1360) 20\n"]
    sched = {"zygote": {"cpu": 0.4, "wait": 0.1, "zmq_cpu": 0.0, "libuv_cpu": 0.0}}
    s = bp.summarise(bp.parse_raw(raw), {"accepted": 100, "cpu_seconds_by_process": {}}, source, sched)
    assert s["processes"]["zygote"]["cpu_ms_per_message"] == pytest.approx(4.0)
    assert s["processes"]["zygote"]["activities_ms_per_message"] == {bp.STARTUP: pytest.approx(4.0)}


# --------------------------------------------------------------------------- classifier

@pytest.mark.parametrize("stack, activity", [
    # the source line decides where a C call hides: syncfs, fsync, write, fork
    (("Committer._run (smtpd/queue.py:100)", "Spool.commit_batch (smtpd/queue_fs.py:216)",
      "Spool.sync (smtpd/queue_fs.py:238)"), "fsync/syncfs"),
    (("deliver_maildir (smtpd/maildir.py:456)", "_write_tmp (smtpd/maildir.py:408)"), "fsync/syncfs"),
    (("deliver_maildir (smtpd/maildir.py:456)", "_write_tmp (smtpd/maildir.py:388)"),
     "files: writes/renames/unlinks"),
    (("DeliveryPool.run (smtpd/local_delivery.py:300)", "_Worker.__init__ (smtpd/local_delivery.py:144)"),
     "fork/exec/spawn"),
    # a string's replace() is no file operation: the session's own line
    (("Session._serve (smtpd/smtp_session.py:300)", "Session._log (smtpd/smtp_session.py:120)"), "SMTP session logic"),
    # a line of queue_fs that is none of those: the file's own activity
    (("Spool.delete_envelope (smtpd/queue_fs.py:349)",), "files: writes/renames/unlinks"),
    # nearest known frame from the leaf: zmq under the session is IPC
    (("Runner.run (asyncio/runners.py:118)", "Session._serve (smtpd/smtp_session.py:300)",
      "Mesh.send (common/ipc.py:147)", "Socket.send (zmq/sugar/socket.py:713)"), bp.IPC),
    (("Runner.run (asyncio/runners.py:118)", "Session._flush (smtpd/smtp_session.py:563)"),
     "SMTP session logic"),
    (("Runner.run (asyncio/runners.py:118)", "Session._serve (smtpd/smtp_session.py:300)",
      "ServerConnection.receive_data (smtpd/smtp_proto.py:853)"), "SMTP parsing"),
    (("Mesh._dispatch (common/ipc.py:228)", "decode (common/messages.py:815)"), "IPC encode/decode"),
    (("Runner.run (asyncio/runners.py:118)",), "event loop and thread wake-ups"),
    (("Runner.run (asyncio/runners.py:118)", "MtaSession.send (smtpd/smtp_client.py:90)",
      "StreamWriter.write (asyncio/streams.py:343)"), "MTA (relay client)"),
    (("Mesh._dispatch (common/ipc.py:250)", "Scheduler.handle (smtpd/scheduler.py:90)",
      "RamQueue._alloc (smtpd/scheduler_ram.py:218)"), "scheduling"),
    (("Lka.handle (smtpd/lka.py:300)", "expand (smtpd/expand.py:120)", "StaticTable.lookup (smtpd/table/static.py:40)"),
     "expansion/ruleset/tables (lka)"),
    # scope "stack": inside logging is logging, whatever the leaf; imports are startup
    (("Session._serve (smtpd/smtp_session.py:300)", "Logger.info (logging/__init__.py:1539)",
      "SyslogHandler.emit (common/log.py:80)", "socket.send (socket.py:10)"), "logging"),
    (("<module> (smtpd/main.py:21)", "_find_and_load (<frozen importlib._bootstrap>:1360)",
      "<module> (smtpd/lka.py:5)"), bp.STARTUP),
    (("increment (common/stat.py:25)",), "stats/trace"),
    (("main (smtpd/main.py:180)", "run_child (smtpd/proc.py:87)", "prepare (smtpd/pony.py:79)",
      "client_contexts (smtpd/tls.py:352)", "client_context (smtpd/tls.py:333)"), bp.STARTUP),
    (("Pony.connect (smtpd/mta.py:50)", "client_context (smtpd/tls.py:333)"), "TLS"),
    ((), bp.NO_FRAME),                                    # a process starting or exiting
    (("<module> (<string>:1)", "main (somewhere/else.py:3)"), bp.OTHER),
])
def test_classifier(stack, activity):
    assert bp.classify(frames(*stack), source) == activity


def test_without_sources_a_file_rule_still_applies():
    assert bp.classify(frames("Spool.sync (smtpd/queue_fs.py:238)")) == "files: writes/renames/unlinks"


def test_every_activity_of_the_table_is_listed_once():
    assert len(set(bp.ACTIVITIES)) == len(bp.ACTIVITIES)
    assert {r.activity for r in bp.RULES} <= set(bp.ACTIVITIES)
    assert bp.RULES[0].scope == bp.STACK and {r.scope for r in bp.RULES} == {bp.STACK, bp.FRAME}


def test_source_lines_resolve_against_the_roots(tmp_path):
    (tmp_path / "smtpd").mkdir()
    (tmp_path / "smtpd" / "x.py").write_text("a = 1\nos.fsync(fd)\n")
    lines = bp.SourceLines([tmp_path / "missing", tmp_path])
    assert lines("smtpd/x.py", 2) == "os.fsync(fd)"
    assert lines("smtpd/x.py", 3) == "" and lines("smtpd/x.py", 0) == "" and lines("nope.py", 1) == ""


# --------------------------------------------------------------------------- summary

BENCH = {"accepted": 1000, "cpu_seconds_by_process": {"smtpd: [priv]": 2.0, "smtpd: queue": 3.0,
                                                     "smtpd: control": 0.1}}
RAW = [
    f"{PARENT};Runner.run (asyncio/runners.py:118) 60\n",
    f'{PARENT};process 102:"smtpd: [priv]";_write_tmp (smtpd/maildir.py:408) 40\n',
    QUEUE_SYNC.replace(" 167\n", " 150\n"),
    f"{PARENT};{CHILD};Runner.run (asyncio/runners.py:118);Socket.send (zmq/sugar/socket.py:713) 100\n",
    f"{PARENT};{CHILD};Spool.delete_envelope (smtpd/queue_fs.py:349) 50\n",
]


def test_cpu_per_message_is_measured_cpu_split_by_samples():
    s = bp.summarise(bp.parse_raw(RAW), BENCH, source)
    p = s["processes"]
    assert s["samples"] == 400
    # the parent's title: 2.0 s over 1000 messages, 60:40 between the parent and its worker
    assert p["priv"]["cpu_ms_per_message"] == pytest.approx(1.2)
    assert p[bp.WORKER]["cpu_ms_per_message"] == pytest.approx(0.8)
    assert p["queue"]["cpu_ms_per_message"] == pytest.approx(3.0)
    assert p["queue"]["activities_ms_per_message"] == pytest.approx(
        {"fsync/syncfs": 1.5, bp.IPC: 1.0, "files: writes/renames/unlinks": 0.5})
    assert s["activity_totals_ms_per_message"]["fsync/syncfs"] == pytest.approx(1.5 + 0.8)
    assert sum(s["activity_totals_ms_per_message"].values()) == pytest.approx(5.0)
    # control used CPU but left no sample: said, not lost silently
    assert s["unprofiled_cpu_ms_per_message"] == {"smtpd: control": pytest.approx(0.1)}
    assert p["queue"]["top_leaves"][0] == {"frame": "Spool.sync (smtpd/queue_fs.py:238)",
                                           "activity": "fsync/syncfs", "samples": 150}


def test_schedstat_sets_the_native_threads_apart_and_splits_a_title_by_cpu():
    sched = {"priv": {"cpu": 1.5, "wait": 0.5, "zmq_cpu": 0.0, "libuv_cpu": 0.0},
             bp.WORKER: {"cpu": 0.5, "wait": 0.1, "zmq_cpu": 0.0, "libuv_cpu": 0.0},
             "queue": {"cpu": 3.0, "wait": 6.0, "zmq_cpu": 0.6, "libuv_cpu": 0.0}}
    s = bp.summarise(bp.parse_raw(RAW), BENCH, source, sched)
    p = s["processes"]
    assert p["priv"]["cpu_ms_per_message"] == pytest.approx(1.5)
    assert p[bp.WORKER]["cpu_ms_per_message"] == pytest.approx(0.5)
    q = p["queue"]
    assert q["zmq_io_thread_share"] == pytest.approx(0.2)
    assert q["runqueue_wait_ms_per_message"] == pytest.approx(6.0)
    assert q["activities_ms_per_message"][bp.NATIVE["zmq"]] == pytest.approx(0.6)
    assert q["activities_ms_per_message"]["fsync/syncfs"] == pytest.approx(2.4 * 150 / 300)
    assert sum(q["activities_ms_per_message"].values()) == pytest.approx(3.0)


def test_sched_totals_add_threads_by_process():
    threads = [{"label": "lka", "kind": "python", "cpu": 1.0, "wait": 2.0},
               {"label": "lka", "kind": "zmq", "cpu": 0.25, "wait": 0.5},
               {"label": "lka", "kind": "libuv", "cpu": 0.5, "wait": 0.0}]
    assert bp.sched_totals(threads) == {"lka": {"cpu": 1.75, "wait": 2.5, "zmq_cpu": 0.25, "libuv_cpu": 0.5}}


def test_markdown_and_compare_show_the_figures():
    s = bp.summarise(bp.parse_raw(RAW), BENCH, source)
    text = bp.markdown(s, {"bench": {"mode": "maildir", "n": 1000}, "rate": 100})
    assert "| queue | 300 | 75.0 % | 3.00 |" in text
    assert "NOT SAMPLED by py-spy (CPU ms/msg, left out of both tables): smtpd: control 0.10" in text
    assert "| fsync/syncfs | | 0.80 | 1.50 | **2.30** |" in text.replace("|  |", "| |")
    after = bp.summarise(bp.parse_raw(RAW[:3]), BENCH, source)
    table = bp.compare(s, after)
    assert "| process queue | 3.00 | 3.00 | +0.00 |" in table
    assert f"| {bp.IPC} | 1.00 | 0.00 | -1.00 |" in table
    assert "| **all** | 5.00 | 5.00 | +0.00 |" in table
    assert "| **all without start and exit** | 5.00 | 5.00 | +0.00 |" in table


def test_labels_seen_in_proc_correct_a_command_line_py_spy_saw_before_the_exec():
    stale = [f'{PARENT};process 105:"python -m smtpd -d";Spool.sync (smtpd/queue_fs.py:238) 30\n',
             f'{PARENT};Runner.run (asyncio/runners.py:118) 10\n']
    bench = {"accepted": 10, "cpu_seconds_by_process": {"smtpd: [priv]": 0.1, "smtpd: queue": 0.3}}
    s = bp.summarise(bp.parse_raw(stale), bench, source, pid_labels={105: "queue", 100: "ignored"})
    assert set(s["processes"]) == {"priv", "queue"}
    assert s["processes"]["queue"]["cpu_ms_per_message"] == pytest.approx(30.0)
    assert s["processes"]["queue"]["activities_ms_per_message"] == {"fsync/syncfs": pytest.approx(30.0)}


def test_whole_life_cpu_is_preferred_to_the_load_alone():
    """py-spy samples each process from its start: its samples are scaled by bench_mail's
    whole-life figure, not by the load's (``cpu_seconds_by_process`` in today's JSON)."""
    stacks = [f'{PARENT};process 105:"smtpd: queue";Spool.sync (smtpd/queue_fs.py:238) 30\n']
    bench = {"accepted": 10, "cpu_seconds_by_process": {"smtpd: queue": 0.2},
             "cpu_seconds_by_process_with_startup": {"smtpd: queue": 0.3}}
    s = bp.summarise(bp.parse_raw(stacks), bench, source)
    assert s["processes"]["queue"]["cpu_ms_per_message"] == pytest.approx(30.0)
