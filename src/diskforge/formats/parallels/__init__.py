from ...registry import Format
FORMAT = Format()
