"""``diskforge formats``: every registered plugin and what it can do, from the registry."""

from __future__ import annotations


def cmd_formats(args) -> int:
    import json

    from ..registry import all_formats, get
    if args.options:
        # ``-o help`` prints qemu-img's listing verbatim; this is where every option
        # diskforge takes (its own ones too) is listed
        from .qemu_text import own_option_help
        print(own_option_help(get(args.options)), end="")
        return 0
    rows = []
    for plugin in all_formats().values():
        rows.append({"name": plugin.name, "aliases": list(plugin.aliases),
                     "extensions": list(plugin.extensions), "probe": plugin.can_probe,
                     "read": plugin.can_read, "write": plugin.can_write,
                     "random-write": plugin.can_read and plugin.random_write,
                     "measure": plugin.can_measure, "description": plugin.description})
    if args.output == "json":
        print(json.dumps(rows, indent=4))
        return 0
    yes = {True: "yes", False: "-"}
    head = ("FORMAT", "ALIASES", "EXTENSIONS", "PROBE", "READ", "WRITE", "RANDOM-WRITE",
            "DESCRIPTION")
    table = [head] + [(r["name"], ",".join(r["aliases"]) or "-",
                       ",".join(r["extensions"]) or "-", yes[r["probe"]], yes[r["read"]],
                       yes[r["write"]], yes[r["random-write"]], r["description"])
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("formats", help="list the image formats and what each can do")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--options", metavar="FMT",
                   help="list every -o option diskforge takes for FMT, its own included"
                        " (-o help prints qemu-img's listing)")
    p.set_defaults(func=cmd_formats)
