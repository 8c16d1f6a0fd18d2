"""Export rows: ``export --to gcp`` and ``--to azure`` of the mixed disk beside the shell
recipe the vendors document, in the same run.

- Google (https://cloud.google.com/compute/docs/import/import-existing-image): the disk
  as ``disk.raw`` grown to a whole GiB, then ``tar --format=oldgnu -Sczf``:
  ``qemu-img convert`` + ``qemu-img resize`` + ``tar`` (gzip on one core);
- Azure (https://learn.microsoft.com/azure/virtual-machines/linux/create-upload-generic):
  ``qemu-img convert`` to raw, ``qemu-img resize`` to a whole MiB, ``qemu-img convert
  -O vpc -o subformat=fixed,force_size``.

Aims (issue 15): ratio at most 0.5 for gcp (gzip on every core), 1.0 for azure.
"""

import shlex

from run import Case, Tool, diskforge_cmd, have

GiB, MiB = 1 << 30, 1 << 20


def out(name):
    return lambda ctx: ctx.path(name)


def _round(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _gcp_recipe(c) -> list[str]:
    work = c.path("gcp-recipe")
    q = shlex.quote
    return ["sh", "-c",
            f"rm -rf {q(work)} && mkdir {q(work)} && "
            f"qemu-img convert -f raw -O raw {q(c.source)} {q(work)}/disk.raw && "
            f"qemu-img resize -q -f raw {q(work)}/disk.raw {_round(c.size, GiB)} && "
            f"tar --format=oldgnu -Sczf {q(c.path('out-qi.tar.gz'))} -C {q(work)} disk.raw"
            f" && rm -rf {q(work)}"]


def _azure_recipe(c) -> list[str]:
    tmp = c.path("azure-recipe.raw")
    q = shlex.quote
    return ["sh", "-c",
            f"qemu-img convert -f raw -O raw {q(c.source)} {q(tmp)} && "
            f"qemu-img resize -q -f raw {q(tmp)} {_round(c.size, MiB)} && "
            f"qemu-img convert -f raw -O vpc -o subformat=fixed,force_size {q(tmp)}"
            f" {q(c.path('out-qi.vhd'))} && rm -f {q(tmp)}"]


CASES = [
    Case("export --to gcp", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["export", "--to", "gcp", "-q",
                                                       c.source, c.path("out-df.tar.gz")],
             out("out-df.tar.gz")),
        Tool("qemu-img+tar", _gcp_recipe, out("out-qi.tar.gz"), have("qemu-img")),
    ]),
    Case("export --to azure", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["export", "--to", "azure", "-q",
                                                       c.source, c.path("out-df.vhd")],
             out("out-df.vhd")),
        Tool("qemu-img", _azure_recipe, out("out-qi.vhd"), have("qemu-img")),
    ]),
]
