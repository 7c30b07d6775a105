"""Command-line entry point: a thin dispatcher.

Only argparse and the standard library are imported here, so ``--help`` is
instant; each subcommand imports what it needs when it runs, and torch is
never imported on the way to the chat prompt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shammah import __version__
from shammah.errors import ShammahError

EPILOG = """\
chat commands: /good [note]  /medium <note>  /critical <note>  /fix <answer>  /accept /edit /reject
               /feedback list|show|undo|drop <id>  /train [status|cancel|wait]
               /adapters list|load|off|rollback|info|delete  /status  /system <text>  /clear  /help  /exit
environment:   SHAMMAH_HOME (all state), SHAMMAH_MODEL (model.base), SHAMMAH_LOG (log level)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shammah",
        description="A local-first terminal assistant that learns from your feedback.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"shammah {__version__}")
    _global_options(p, None)
    # The same options after the subcommand (`shammah ask --model X`); SUPPRESS keeps a value given
    # before the subcommand when none is given after it.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser("chat", help="open the chat (the default)", parents=[common])
    chat.add_argument(
        "--no-server", action="store_true", help="load the model here even when `shammah serve` runs on this home"
    )
    ask = sub.add_parser(
        "ask",
        help="print one reply to a question and exit",
        parents=[common],
        description="Print one reply and exit. The question is the arguments, or standard input when there are none.",
    )
    ask.add_argument("question", nargs="*", help="the question (default: read it from standard input)")
    ask.add_argument("-s", "--system", metavar="TEXT", help="system prompt for this question")
    ask.add_argument("-a", "--adapter", metavar="NAME", help="answer with this adapter ('none' = the base model)")
    ask.add_argument("--json", action="store_true", help="print one JSON object: reply, turn id, adapter, tokens")
    ask.add_argument("-t", "--temperature", type=float, metavar="T", help="sampling temperature (0 = greedy)")
    ask.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass")
    ask.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens (0 = off)")
    ask.add_argument("--seed", type=int, metavar="N", help="random seed for sampling")
    ask.add_argument("-n", "--max-tokens", type=int, metavar="N", help="longest reply, in tokens")
    tr = sub.add_parser(
        "train", help="train an adapter from a dataset (and a manifest)"
    )  # its --config is the training config
    from shammah.training.run import add_arguments

    add_arguments(tr)
    ad = sub.add_parser(
        "adapters", help="list, inspect, delete, export, package, verify and install adapters", parents=[common]
    )
    ads = ad.add_subparsers(dest="action", metavar="ACTION")
    ads.add_parser("list", help="the registered adapters (the default)", parents=[common])
    for action, what in (("info", "show an adapter's metadata and report"), ("delete", "delete an adapter")):
        ads.add_parser(action, help=what, parents=[common]).add_argument("name")
    pk = ads.add_parser(
        "pack",
        help="write an adapter as a .expert package (optionally signed)",
        parents=[common],
        description="A .expert package: manifest.json, LICENSE and the adapter (safetensors + config), "
        "every file's sha256 in the manifest; --sign adds your ed25519 signature (`shammah keys generate`).",
    )
    pk.add_argument("name")
    pk.add_argument("-o", "--output", metavar="FILE", help="package file (default: NAME-VERSION.expert here)")
    pk.add_argument("--sign", action="store_true", help="sign with your publisher key")
    pk.add_argument("--version", dest="pkg_version", default="1.0.0", metavar="V", help="package version [1.0.0]")
    pk.add_argument("--description", default="", help="one line on what the adapter does")
    pk.add_argument("--author", default="", help="who made it")
    pk.add_argument("--license", dest="license_name", default="unspecified", metavar="ID", help="license id (MIT, …)")
    pk.add_argument("--license-file", metavar="FILE", help="the license text to include")
    pk.add_argument("--keywords", default="", metavar="K1,K2", help="routing keywords")
    ex = ads.add_parser(
        "export",
        help="export an adapter for PEFT/vLLM, merged for transformers, as GGUF for llama.cpp/Ollama",
        parents=[common],
        description="Writes OUT/adapter (PEFT with the base's public id and a model card); --merged adds OUT/merged "
        "(a transformers model); --gguf adds NAME-TYPE.gguf (merged) and NAME-lora-f16.gguf (llama.cpp --lora); "
        "--ollama adds a Modelfile (FROM the base + ADAPTER the LoRA).",
    )
    ex.add_argument("name")
    ex.add_argument("-o", "--output", metavar="DIR", help="where to write (default: ./NAME-export)")
    ex.add_argument("--merged", action="store_true", help="base + adapter merged into a transformers model")
    ex.add_argument("--gguf", action="store_true", help="GGUF files for llama.cpp")
    ex.add_argument(
        "--type", dest="gguf_type", metavar="TYPE", help="GGUF type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 [f16]"
    )
    ex.add_argument("--ollama", action="store_true", help="a Modelfile for `ollama create` (implies --gguf)")
    vf = ads.add_parser("verify", help="check a .expert package's hashes and signature", parents=[common])
    vf.add_argument("file")
    ins = ads.add_parser(
        "install",
        help="verify a .expert package and register its adapter",
        parents=[common],
        description="Verify every hash and the signature, refuse a package for another base model, and register "
        "the adapter. Unsigned packages and unknown publishers need --allow-untrusted.",
    )
    ins.add_argument("file")
    ins.add_argument("--name", help="register under this name (default: the package's)")
    ins.add_argument("--allow-untrusted", action="store_true", help="install an unsigned or unknown-publisher package")
    ky = sub.add_parser("keys", help="your publisher key for signing .expert packages", parents=[common])
    kys = ky.add_subparsers(dest="action", metavar="ACTION")
    kys.add_parser("show", help="print your public key (the default)", parents=[common])
    kg = kys.add_parser("generate", help="make an ed25519 key pair (private key 0600 in the home)", parents=[common])
    kg.add_argument("--force", action="store_true", help="replace the existing key")
    logs = sub.add_parser(
        "logs",
        help="show recent questions, replies and your ratings of them",
        parents=[common],
        description="The latest turns from the chat and `shammah ask`, oldest first, with their ratings.",
    )
    logs.add_argument("-n", "--count", type=int, default=10, metavar="N", help="how many turns (0 = all; default 10)")
    logs.add_argument("--json", action="store_true", help="print a JSON array of turns with their feedback")
    logs.add_argument("-a", "--adapter", metavar="NAME", help="only turns answered by this adapter ('none' = the base)")
    srv = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API with feedback, adapters and training jobs",
        parents=[common],
        description="Serve the model over HTTP: /v1/chat/completions (OpenAI-compatible; model = an adapter "
        "name per request), /v1/models, /v1/feedback, /v1/adapters, /v1/jobs. Docs at /docs.",
    )
    srv.add_argument("--host", help="address to bind [serve.host: 127.0.0.1]; beyond loopback needs serve.token")
    srv.add_argument("--port", type=int, help="port [serve.port: 8000; 0 = any free port]")
    ev = sub.add_parser(
        "eval",
        help="score the base model or an adapter on prompts with reference answers",
        parents=[common],
        description="Greedy replies to every prompt of a JSONL set (prompt/completion or messages), scored against "
        "the references: exact, json, fields, accuracy, f1, chrf, loss, perplexity, latency. TARGET is 'base', an adapter, "
        "or A+B (two LoRA adapters composed). An adapter's results are kept in its report (`adapters info`).",
    )
    ev.add_argument("target", help="'base', an adapter name, or NAME1+NAME2")
    ev.add_argument("--dataset", required=True, metavar="FILE", help="JSONL with prompts and reference answers")
    ev.add_argument("--metrics", metavar="M1,M2", help="which metrics (default: those that fit the references)")
    ev.add_argument("--compare", metavar="OTHER", help="also score OTHER ('base' or an adapter) and show the deltas")
    ev.add_argument("-n", "--max-tokens", type=int, default=128, metavar="N", help="longest reply [128]")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    pl = sub.add_parser(
        "pipeline",
        help="a named training: schema -> synthetic data -> SFT -> preferences -> DPO -> GGUF -> eval",
        parents=[common],
        description="Runs the stages of the named training NAME (schemas/NAME.yaml under --root) in order, each "
        "once: a stopped run goes on where it stopped. A teacher model behind any OpenAI-compatible API "
        "(pipeline.teacher_url) writes the data.",
    )
    pl.add_argument("name", help="the named training (schemas/NAME.yaml)")
    pl.add_argument(
        "stage", nargs="?", default="all", choices=("all", "generate", "sft", "preferences", "dpo", "quantize", "eval")
    )
    pl.add_argument("--root", default=".", metavar="DIR", help="the project directory [.]")
    pl.add_argument("--force", action="store_true", help="redo the stage (all: start the whole training fresh)")
    pl.add_argument("-n", "--examples", type=int, metavar="N", help="examples to generate [pipeline.examples]")
    pl.add_argument("--teacher-url", metavar="URL", help="teacher API root [pipeline.teacher_url]")
    pl.add_argument("--teacher-model", metavar="NAME", help="teacher model [pipeline.teacher_model]")
    cfg = sub.add_parser("config", help="show the config in use, or the documented defaults", parents=[common])
    cfg.add_argument("what", nargs="?", choices=("path", "show", "example"), default="show")
    return p


def _global_options(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--config", metavar="PATH", default=default, help="config file (default: $SHAMMAH_HOME/config.toml)")
    p.add_argument(
        "--model", metavar="MODEL", default=default, help='override model.base ("embedded", a HF id, a dir, a .gguf)'
    )


def setup_logging(level: str, logs_dir) -> None:
    from shammah.paths import ensure_dir

    ensure_dir(logs_dir)
    handler = logging.FileHandler(logs_dir / "shammah.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    if level in ("debug", "info"):  # asked for verbosity: show it on stderr too
        root.addHandler(logging.StreamHandler(sys.stderr))


def _quiet_ml() -> None:
    """Library notes and progress bars of transformers are not the user's concern in a command."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load(args):
    from shammah.config import load_config, with_overrides
    from shammah.paths import Paths

    cfg, cfg_path = load_config(args.config)
    if args.model:
        cfg = with_overrides(cfg, model={"base": args.model})
    paths = Paths.from_env().ensure()
    setup_logging(cfg.logging.level, paths.logs)
    warning = paths.too_open()
    if warning:
        sys.stderr.write(f"warning: {warning}\n")
    return cfg, cfg_path, paths


def _session(cfg, paths, interactive: bool, server: dict | None = None):
    """The chat's session: on its own engine and trainer, or on the running server ``server``."""
    from shammah.feedback.store import Store
    from shammah.repl.commands import ChatSession
    from shammah.repl.io import Console

    console = Console(interactive=interactive, replies_only=not interactive)
    store = Store(paths.db, cfg.feedback)
    if server is not None:
        from shammah.engine.resolve import resolve
        from shammah.serve import remote

        via, spec = remote.Server(server["url"], cfg.serve.token), resolve(cfg.model.base)
        engine, jobs = remote.RemoteEngine(via, spec, store), remote.RemoteJobs(via, spec, store, paths.adapters)
        return ChatSession(cfg, engine, store, console, paths, jobs)
    from shammah.engine import Engine
    from shammah.jobs import JobManager

    engine = Engine(cfg.model, paths.cache)
    return ChatSession(cfg, engine, store, console, paths, JobManager(cfg, paths, store, engine))


def cmd_chat(args) -> int:
    import asyncio

    from shammah.repl import app

    cfg, _, paths = _load(args)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    session = _session(cfg, paths, interactive, None if getattr(args, "no_server", False) else _server_for(cfg, paths))
    if interactive:
        history = paths.history if cfg.chat.history else None
        if history is not None:
            from shammah.paths import touch_private

            touch_private(history)
        asyncio.run(app.run_interactive(session, history_path=history))
    else:
        if hasattr(sys.stdin, "reconfigure"):  # a stray non-UTF-8 byte must not cost the line (or the script)
            sys.stdin.reconfigure(errors="replace")
        asyncio.run(app.run_lines(session))
    session.store.close()
    if session.failures and not interactive:
        sys.stderr.write(f"error: {session.failures} line(s) failed (see above)\n")
        return 1
    return 0


def cmd_ask(args) -> int:
    import asyncio
    import io
    import json

    from shammah.config import with_overrides

    question = " ".join(args.question).strip() if args.question else sys.stdin.read().strip()
    if not question:
        raise ShammahError("no question: give it as arguments (shammah ask What is …) or on standard input")
    cfg, _, paths = _load(args)
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "max_new_tokens": args.max_tokens,
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    via = _server_for(cfg, paths) if args.top_k is None else None  # top_k is not in the OpenAI API
    if via is not None:
        return _ask_server(args, cfg, paths, via, question, sampling)
    if sampling:
        cfg = with_overrides(cfg, model=sampling)
    session = _session(cfg, paths, interactive=False)
    if args.json:  # the streamed reply is not printed; the JSON object carries it
        session.console._out = io.StringIO()
    if args.system is not None:
        session.system_prompt = args.system
    try:
        if args.adapter is not None:
            asyncio.run(session.use_adapter(None if args.adapter == "none" else args.adapter))
        asyncio.run(session.ask(question))
        if session.last_turn_id is None:
            return 1
        turn = session.store.turn(session.last_turn_id)
    finally:
        session.store.close()
    if args.json:
        rec = {
            "reply": turn.reply,
            "turn_id": turn.id,
            "model": turn.model,
            "adapter": turn.adapter,
            "finish_reason": turn.finish_reason,
        }
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return 0


def _server_for(cfg, paths) -> dict | None:
    """A running `shammah serve` on this home with the same base model, answering."""
    from shammah.engine.resolve import resolve
    from shammah.serve.client import reachable, running_server

    info = running_server(paths.root)
    if info is None or info.get("model") != resolve(cfg.model.base).name or not reachable(info["url"]):
        return None
    return info


def _ask_server(args, cfg, paths, server: dict, question: str, sampling: dict) -> int:
    """`shammah ask` through the running server: no second model load."""
    import json

    from shammah.feedback.store import Store
    from shammah.serve.client import stream_chat

    model = {None: "shammah", "none": server["model"]}.get(args.adapter, args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": question}
    ]
    body = {"model": model, "messages": messages}
    names = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
    body.update({names[k]: v for k, v in sampling.items() if k in names})
    completion_id = finish = None
    for chunk in stream_chat(server["url"], cfg.serve.token, body):
        completion_id = chunk["id"]
        for choice in chunk["choices"]:
            finish = choice.get("finish_reason") or finish
            text = choice["delta"].get("content")
            if text and not args.json:
                sys.stdout.write(text)
                sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
        return 0
    store = Store(paths.db)
    try:
        turn = store.turn(store.turn_of_completion(completion_id))
    finally:
        store.close()
    rec = {
        "reply": turn.reply,
        "turn_id": turn.id,
        "model": turn.model,
        "adapter": turn.adapter,
        "finish_reason": finish,
        "server": server["url"],
    }
    sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return 0


def cmd_train(args) -> int:
    from shammah.training import run

    if os.environ.get("SHAMMAH_PARENT_PID"):  # a server's dataset job: never train on as an orphan
        from shammah.training.worker import die_with_parent

        die_with_parent()
    cfg, _, paths = _load(args)
    try:
        return run.main(args, cfg, paths)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: checkpoints are kept; continue with the same command plus --resume\n")
        return 130


def cmd_adapters(args) -> int:
    import json

    from shammah.adapters.registry import Registry, table
    from shammah.repl.io import Console

    cfg, _, paths = _load(args)
    reg = Registry(paths.adapters)
    out = Console()
    action = args.action or "list"
    if action == "list":
        items = reg.list()
        if not items:
            out.info("No adapters yet. Train one with `shammah train --dataset data.jsonl`.")
            return 0
        header, rows = table(items, None)
        out.table(rows, header=header)
        return 0
    if action == "info":
        info = reg.get(args.name)
        out.text(json.dumps({"path": str(info.path), **info.meta}, indent=2))
    elif action == "delete":
        reg.delete(args.name)
        out.ok(f"deleted adapter {args.name}")
    elif action in ("pack", "verify", "install"):
        return _packages(action, args, cfg, paths, reg, out)
    elif action == "export":
        return _export(args, cfg, paths, reg, out)
    return 0


def _export(args, cfg, paths, reg, out) -> int:
    """`shammah adapters export`."""
    from pathlib import Path

    from shammah.adapters import export
    from shammah.engine.engine import FALLBACK_SAMPLING
    from shammah.engine.loader import local_dir

    _quiet_ml()
    info = reg.get(args.name)
    gguf_type = args.gguf_type or ("f16" if args.gguf else None)
    spec, base_dir = local_dir(info.get("base", "requested") or cfg.model.base, paths.cache)
    base_gguf = Path(spec.source) / spec.gguf_file if spec.kind == "gguf" else None
    m = cfg.model
    sampling = {
        "temperature": FALLBACK_SAMPLING["temperature"] if m.temperature == "auto" else m.temperature,
        "top_p": FALLBACK_SAMPLING["top_p"] if m.top_p == "auto" else m.top_p,
    }
    export.export(
        info,
        base_dir,
        Path(args.output or f"{info.name}-export"),
        merged=args.merged,
        gguf_type=gguf_type,
        ollama=args.ollama,
        base_gguf=base_gguf,
        sampling=sampling,
        say=out.ok,
    )
    return 0


def _packages(action: str, args, cfg, paths, reg, out) -> int:
    """`shammah adapters pack|verify|install`."""
    from pathlib import Path

    from shammah.adapters import keys, package

    trusted = cfg.packages.trusted_publishers
    if action == "pack":
        info = reg.get(args.name)
        key = keys.load_private(paths.root) if args.sign else None
        license_text = None
        if args.license_file:
            try:
                license_text = Path(args.license_file).read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ShammahError(f"--license-file {args.license_file}: cannot read it ({e})") from None
        target = Path(args.output or f"{info.name}-{args.pkg_version}.expert")
        m = package.pack(
            info,
            target,
            version=args.pkg_version,
            description=args.description,
            author=args.author,
            license_name=args.license_name,
            license_text=license_text,
            keywords=tuple(k.strip() for k in args.keywords.split(",") if k.strip()),
            signing_key=key,
            publisher=cfg.packages.publisher or _login(),
        )
        signed = f"signed by {m['integrity']['pubkey']}" if key else "unsigned (--sign signs it)"
        out.ok(f"wrote {target} ({target.stat().st_size} bytes, {signed})")
        return 0
    if action == "verify":
        pkg = package.open_package(Path(args.file))
        out.table(package.describe(pkg, trusted))
        out.ok(f"{args.file}: OK")
        return 0
    from shammah.engine.fingerprint import fingerprint
    from shammah.engine.loader import local_dir

    spec, base_dir = local_dir(cfg.model.base, paths.cache)
    base_fp = fingerprint(base_dir)
    info = package.install(
        Path(args.file),
        reg,
        base_fingerprint=base_fp,
        base_name=spec.name,
        trusted=trusted,
        allow_untrusted=args.allow_untrusted,
        name=args.name,
    )
    out.ok(f"installed {info.name} ({info.get('package', 'trust')}); `/adapters load {info.name}` in the chat uses it")
    return 0


def cmd_eval(args) -> int:
    import hashlib
    import json
    import time
    from pathlib import Path

    from shammah import evaluate
    from shammah.adapters.registry import Registry
    from shammah.engine.loader import local_dir
    from shammah.repl.io import Console

    _quiet_ml()
    cfg, _, paths = _load(args)
    reg = Registry(paths.adapters)
    targets = [args.target] + ([args.compare] if args.compare else [])
    for t in targets:  # unknown names fail before the model loads
        for name in [] if t == "base" else t.split("+"):
            reg.get(name)
    items = evaluate.load_items(Path(args.dataset))
    metrics = evaluate.parse_metrics(args.metrics, [it.reference for it in items])
    spec, base_dir = local_dir(cfg.model.base, paths.cache)
    ev = evaluate.Evaluator(base_dir, reg, args.max_tokens, cfg.model.threads)
    out = Console()
    results = {}
    for t in targets:
        ev.use(t)
        results[t], _ = ev.run(items, metrics, lambda done, total, t=t: sys.stderr.write(f"\reval {t}: {done}/{total}"))
        sys.stderr.write("\n")
        if t != "base" and "+" not in t:
            digest = hashlib.sha256(Path(args.dataset).read_bytes()).hexdigest()[:16]
            record = {"dataset": str(Path(args.dataset).resolve()), "sha256": digest, "examples": len(items)}
            record |= {"metrics": results[t], "at": time.time(), "base": spec.name}
            evals = {**(reg.get(t).get("eval") or {}), Path(args.dataset).name: record}
            reg.update(t, eval=evals)
    if args.json:
        sys.stdout.write(json.dumps({"dataset": args.dataset, "examples": len(items), "results": results}) + "\n")
        return 0
    header, rows = evaluate.comparison_rows(args.target, results[args.target], args.compare, results.get(args.compare))
    out.table(rows, header=header)
    return 0


def cmd_pipeline(args) -> int:
    from pathlib import Path

    from shammah.config import with_overrides
    from shammah.pipeline.run import Layout, Pipeline, table
    from shammah.repl.io import Console

    _quiet_ml()
    cfg, _, paths = _load(args)
    over = {"examples": args.examples, "teacher_url": args.teacher_url, "teacher_model": args.teacher_model}
    over = {k: v for k, v in over.items() if v is not None}
    if over:
        cfg = with_overrides(cfg, pipeline=over)
    out = Console()
    p = Pipeline(Layout(Path(args.root).resolve(), args.name), cfg, paths, say=out.info)
    p.run(args.stage, force=args.force)
    if getattr(p, "results", None):
        header, rows = table(p.results)
        out.table(rows, header=header)
    return 0


def _login() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def cmd_keys(args) -> int:
    from shammah.adapters import keys
    from shammah.repl.io import Console

    _, _, paths = _load(args)
    out = Console()
    if args.action == "generate":
        pub = keys.generate(paths.root, force=args.force)
        out.ok(f"new publisher key in {keys.key_files(paths.root)[0]} (keep it private)")
        out.text(pub)
        return 0
    _, pub_file = keys.key_files(paths.root)
    if not pub_file.is_file():
        raise ShammahError("no publisher key yet: run `shammah keys generate`")
    out.text(pub_file.read_text().strip())
    return 0


def cmd_logs(args) -> int:
    import json
    import time

    from shammah.feedback.store import Store
    from shammah.repl.io import printable

    if args.count < 0:
        raise ShammahError("-n must be 0 (all) or more")
    _, _, paths = _load(args)
    store = Store(paths.db)
    none = args.adapter is not None and args.adapter.lower() == "none"
    turns = store.log(args.count, None if none else args.adapter, base_only=none)
    if args.json:
        sys.stdout.write(json.dumps(turns, indent=2, ensure_ascii=False) + "\n")
        return 0
    if not turns:
        sys.stderr.write('No turns yet: chat with `shammah`, or `shammah ask "a question"`.\n')
        return 0
    for t in turns:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["created_at"]))
        print(
            f"## #{t['id']}  {when}  {t['adapter'] or 'base model'}  "
            f"({t['new_tokens']} tokens, {t['seconds']:.1f} s, {t['finish_reason']})"
        )
        print(printable(f"> {t['prompt']}"))
        print(printable(t["reply"]))
        for f in t["feedback"]:
            what = f["rating"] if f["rating"] != "fix" else f"fix ({f['fix_source'] or 'user'})"
            text = f["note"] or f["fix"] or ""
            where = f", trained in {f['trained_in']}" if f["trained_in"] else ""
            print(printable(f"   [{what}, weight {f['weight']:g}{where}] {text}".rstrip()))
        print()
    return 0


def cmd_serve(args) -> int:
    import socket

    import uvicorn

    from shammah.serve.app import create_app
    from shammah.serve.client import running_server
    from shammah.serve.server import Server, check_bind

    cfg, _, paths = _load(args)
    host = args.host or cfg.serve.host
    port = cfg.serve.port if args.port is None else args.port
    check_bind(host, cfg.serve.token)
    other = running_server(paths.root)
    if other is not None:
        raise ShammahError(f"a server for {paths.root} is already running at {other['url']} (pid {other['pid']})")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ShammahError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    server = Server(cfg, paths)
    server.url = url
    adapter = server.default_adapter or "none (the base model)"
    sys.stderr.write(
        f"shammah serve: listening on {url}/v1 (model {server.engine.spec.name}, adapter {adapter}"
        f"{', token required' if cfg.serve.token else ''}); API docs at {url}/docs. Ctrl+C stops.\n"
    )
    sys.stderr.flush()
    config = uvicorn.Config(create_app(server), log_level=cfg.logging.level, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def cmd_config(args) -> int:
    from shammah.config import ENV_OVERRIDES, render, render_example

    if args.what == "example":
        sys.stdout.write(render_example())
        return 0
    cfg, cfg_path, _ = _load(args)
    if args.what == "path":
        print(cfg_path)
        return 0
    origins = {key: f"from ${var}" for var, key in ENV_OVERRIDES.items() if os.environ.get(var)}
    if args.model:
        origins["model.base"] = "from --model"
    print(f"# the config in use: {cfg_path}{'' if cfg_path.exists() else ' (not present: defaults)'}")
    sys.stdout.write(render(cfg, origins))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # everything shammah writes (db, WAL, logs, cache, history) is private to the user
    args = build_parser().parse_args(argv)
    handler = {
        "ask": cmd_ask,
        "config": cmd_config,
        "logs": cmd_logs,
        "keys": cmd_keys,
        "eval": cmd_eval,
        "pipeline": cmd_pipeline,
        "train": cmd_train,
        "adapters": cmd_adapters,
        "serve": cmd_serve,
    }.get(args.command, cmd_chat)
    try:
        return handler(args)
    except ShammahError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # e.g. `shammah train --json | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except OSError as e:  # a file or directory shammah needs: name it, say what to do
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(
            f"error: {where}{e.strerror or e}; check that it exists and is writable by you, "
            "or set SHAMMAH_HOME to a directory that is\n"
        )
        return 2
    except Exception as e:  # a bug: one line for the user, the traceback in the log
        logging.getLogger("shammah").exception("unexpected error")
        sys.stderr.write(f"error: {type(e).__name__}: {e} (a bug: please report it with the log)\n")
        return 70


if __name__ == "__main__":
    raise SystemExit(main())
