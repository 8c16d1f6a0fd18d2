"""``diskforge snapshot``: list, create, apply and delete internal snapshots, with
qemu-img's flags (-l, -c NAME, -a NAME|ID, -d NAME|ID)."""

from __future__ import annotations

from .image import add_force_share_arg, add_policy_args, open_source


def cmd_snapshot(args) -> int:
    import json

    from ..errors import UsageError
    actions = [a for a in ("l", "c", "a", "d") if getattr(args, a)]
    if len(actions) > 1:
        raise UsageError("give one of -l, -c, -a, -d")
    action = actions[0] if actions else "l"
    with open_source(args.filename, args.f, args, writable=action != "l") as dev:
        if action == "l":
            snaps = dev.list_snapshots()
            if args.output == "json":
                print(json.dumps(snaps, indent=4))
            elif snaps:
                from ..ops.info import snapshot_table
                print("\n".join(snapshot_table(snaps)))
        elif action == "c":
            dev.create_snapshot(args.c)
        elif action == "a":
            dev.apply_snapshot(args.a)
        else:
            dev.delete_snapshot(args.d)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    p.add_argument("-f", metavar="FMT", help="image format")
    p.add_argument("-l", action="store_true", help="list the snapshots (the default)")
    p.add_argument("-c", metavar="NAME", help="create a snapshot of the current state")
    p.add_argument("-a", metavar="SNAPSHOT", help="revert the image to a snapshot (ID or"
                   " name)")
    p.add_argument("-d", metavar="SNAPSHOT", help="delete a snapshot (ID or name)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-q", action="store_true", help="quiet")
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_snapshot)
