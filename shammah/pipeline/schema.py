"""A named training's task: a command-line tool's commands as a YAML schema, and the checks every
generated example must pass against it.

The model learns to turn a request into one JSON object::

    {"command": "notes", "subcommand": "add", "args": {"title": "groceries", "pinned": true}}

or, when a required argument is missing or the request is not for this tool::

    {"clarify": "Which title should the note have?"}     {"error": "not a notes request"}

Schema file (``schemas/<name>.yaml``)::

    description: Turn a request into a JSON command for the `notes` tool.
    commands:
      notes:
        description: manage notes
        subcommands:
          add:
            description: add a note
            args:
              title: {type: string, required: true}
              pinned: {type: boolean}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shammah.errors import ShammahError

TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


class SchemaError(ShammahError):
    """A schema file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    required: bool
    description: str = ""


@dataclass(frozen=True)
class Schema:
    name: str
    description: str
    commands: dict[str, dict[str, dict[str, Arg]]]  # command -> subcommand -> arg name -> Arg
    docs: dict[str, str]  # "command" / "command subcommand" -> description
    system: str

    def as_text(self) -> str:
        """The schema as the model and the teacher read it."""
        lines = [self.description, ""]
        for cmd, subs in self.commands.items():
            lines.append(f"{cmd}: {self.docs.get(cmd, '')}")
            for sub, args in subs.items():
                spec = ", ".join(f"{a.name} ({a.type}{', required' if a.required else ''})" for a in args.values())
                lines.append(f"  {cmd} {sub}: {self.docs.get(f'{cmd} {sub}', '')} — args: {spec or 'none'}")
        return "\n".join(lines)


def load(path: Path) -> Schema:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such schema file (a named training needs schemas/<name>.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SchemaError(f"{path}: not readable YAML ({e})") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: the schema must be a mapping with 'description' and 'commands'")
    unknown = set(raw) - {"description", "commands", "system"}
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)}; use description, commands, system")
    desc = raw.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise SchemaError(f"{where}: 'description' must say in one line what the tool does")
    cmds_raw = raw.get("commands")
    if not isinstance(cmds_raw, dict) or not cmds_raw:
        raise SchemaError(f"{where}: 'commands' must map each command name to its subcommands")
    commands: dict[str, dict[str, dict[str, Arg]]] = {}
    docs: dict[str, str] = {}
    for cmd, body in cmds_raw.items():
        key = f"commands.{cmd}"
        if not isinstance(body, dict) or not isinstance(body.get("subcommands"), dict) or not body["subcommands"]:
            raise SchemaError(f"{where}: {key} needs 'subcommands' (a mapping of subcommand names)")
        docs[cmd] = str(body.get("description", ""))
        commands[cmd] = {}
        for sub, sbody in body["subcommands"].items():
            skey = f"{key}.subcommands.{sub}"
            sbody = sbody or {}
            if not isinstance(sbody, dict):
                raise SchemaError(f"{where}: {skey} must be a mapping (description, args)")
            docs[f"{cmd} {sub}"] = str(sbody.get("description", ""))
            args: dict[str, Arg] = {}
            for an, ab in (sbody.get("args") or {}).items():
                akey = f"{skey}.args.{an}"
                if not isinstance(ab, dict) or ab.get("type") not in TYPES:
                    raise SchemaError(f"{where}: {akey}.type must be one of {', '.join(TYPES)}")
                args[an] = Arg(an, ab["type"], bool(ab.get("required", False)), str(ab.get("description", "")))
            commands[cmd][sub] = args
    system = raw.get("system") or f"{desc.strip()} Answer with one JSON object only."
    return Schema(path.stem, desc.strip(), commands, docs, system)


def check_output(schema: Schema, out: Any) -> str | None:
    """Why ``out`` is not a valid answer under ``schema`` (None when it is)."""
    if not isinstance(out, dict):
        return "not a JSON object"
    if set(out) == {"clarify"} or set(out) == {"error"}:
        value = next(iter(out.values()))
        return None if isinstance(value, str) and value.strip() else "empty clarify/error message"
    if set(out) - {"command", "subcommand", "args"}:
        return f"unexpected keys {sorted(set(out) - {'command', 'subcommand', 'args'})}"
    cmd, sub, args = out.get("command"), out.get("subcommand"), out.get("args", {})
    if cmd not in schema.commands:
        return f"unknown command {cmd!r}"
    if sub not in schema.commands[cmd]:
        return f"unknown subcommand {cmd} {sub!r}"
    if not isinstance(args, dict):
        return "args is not an object"
    spec = schema.commands[cmd][sub]
    for name, value in args.items():
        if name not in spec:
            return f"unknown argument {name!r} for {cmd} {sub}"
        want = TYPES[spec[name].type]
        if isinstance(value, bool) and spec[name].type != "boolean" or not isinstance(value, want):
            return f"argument {name!r} must be a {spec[name].type}, got {json.dumps(value)}"
    missing = [a.name for a in spec.values() if a.required and a.name not in args]
    if missing:
        return f"required argument(s) {missing} missing (ask with a clarify answer instead)"
    return None
