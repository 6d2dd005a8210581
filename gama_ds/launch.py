"""Launch-time checks for `launch/*.sh`: the hostfile and the recipe against the job's shape.

DeepSpeed's runner reads hostfiles leniently (it accepts `host slots=4 junk`, and a missing
file means "this machine only"); a multi-node job that starts on the wrong shape wastes a
queue wait, so the scripts call `python -m gama_ds.launch check` first and stop with an
error naming the file and line.
"""

from __future__ import annotations

import argparse
import re
import sys

from .config import ConfigError, load_recipe
from .errors import GamaDsError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\d+)$")


class HostfileError(GamaDsError, ValueError):
    """A hostfile line that cannot be used; the message names the file and line."""


def parse_hostfile(path: str) -> dict[str, int]:
    """host -> slots, in file order; `#` starts a comment; every other line is `host slots=N`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise HostfileError(f"{path}: cannot read the hostfile: {err.strerror}") from None
    hosts: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise HostfileError(f"{path}:{number}: {host} has slots={slots}; a node needs at least 1")
        if host in hosts:
            raise HostfileError(f"{path}:{number}: {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{path}: no hosts (one 'HOST slots=N' line per node)")
    return hosts


def check(
    hostfile: str, recipe: str, overrides: list[str], devices: int | None = None, node_rank: int | None = None
) -> dict:
    """The job's shape, or an error: equal slots on every node, matching this node's devices
    when known, and a global batch that micro batch x world size divides."""
    hosts = parse_hostfile(hostfile)
    slots = set(hosts.values())
    if len(slots) != 1:
        listing = ", ".join(f"{h}={n}" for h, n in hosts.items())
        raise HostfileError(f"{hostfile}: nodes have different slot counts ({listing}); use the same on each")
    per_node = slots.pop()
    if devices is not None and devices != per_node:
        raise HostfileError(
            f"{hostfile}: slots={per_node} per node, but this node has {devices} devices; "
            "set slots to the GPUs per node"
        )
    if node_rank is not None and not 0 <= node_rank < len(hosts):
        raise HostfileError(f"NODE_RANK={node_rank}, but {hostfile} lists {len(hosts)} node(s)")
    world = per_node * len(hosts)
    r = load_recipe(recipe, overrides)
    step = r.train.micro_batch_size * world
    if r.train.global_batch_size % step:
        raise ConfigError(
            f"train.global_batch_size {r.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {r.train.micro_batch_size} x world size {world} "
            f"({len(hosts)} node(s) x {per_node})"
        )
    return {
        "hosts": list(hosts),
        "slots": per_node,
        "world_size": world,
        "accumulation": r.train.global_batch_size // step,
        "master": next(iter(hosts)),
    }


TRAINER_OPTIONS = ("--resume", "--stop-at")


def _without_trainer_options(argv: list[str]) -> list[str]:
    """launch/train.sh hands the same arguments to this check and to the trainer, whose own
    options (`--resume auto`, `--stop-at N`) may sit anywhere among the overrides."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in TRAINER_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in TRAINER_OPTIONS)):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gama_ds.launch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check a hostfile and a recipe before launching")
    p.add_argument("hostfile")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--devices", type=int, help="devices on this node (default: not checked)")
    p.add_argument("--node-rank", type=int)
    p.add_argument("--field", choices=("world_size", "master", "nodes", "slots"), help="print only this")
    args = parser.parse_args(_without_trainer_options(sys.argv[1:] if argv is None else argv))
    try:
        shape = check(args.hostfile, args.recipe, args.overrides, args.devices, args.node_rank)
    except GamaDsError as err:
        print(f"gama_ds.launch: error: {err}", file=sys.stderr)
        return 2
    if args.field == "nodes":
        print(len(shape["hosts"]))
    elif args.field:
        print(shape[args.field])
    else:
        print(
            f"{len(shape['hosts'])} node(s) x {shape['slots']} = world size {shape['world_size']}, "
            f"gradient accumulation {shape['accumulation']}, master {shape['master']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
