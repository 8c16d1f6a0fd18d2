"""presign: a time-limited HTTPS URL for an ``s3://`` object, so a machine without
credentials (a hypervisor host, a cloud import service, ``curl``) can read it. The
URL carries a SigV4 signature in its query (``X-Amz-Signature``), made locally by
boto3 from the usual credentials; nothing is sent to S3."""

from __future__ import annotations


def cmd_presign(args) -> int:
    from ..remote import scheme_of
    from ..errors import UsageError
    if scheme_of(args.url) != "s3":
        raise UsageError("presign takes an s3://BUCKET/KEY name", args.url)
    from ..remote.s3 import presign
    print(presign(args.url, args.expires))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("presign",
                       help="print a presigned HTTPS GET URL for an s3:// object")
    p.add_argument("--expires", type=int, default=3600, metavar="SECONDS",
                   help="how long the URL works (default 3600; at most 604800, 7 days)")
    p.add_argument("url", metavar="s3://BUCKET/KEY")
    p.set_defaults(func=cmd_presign)
