"""The NBD protocol's constants, named and valued as the protocol document names them
(github.com/NetworkBlockDevice/nbd, doc/proto.md), so a reader can grep the spec for any
name used in ``nbd.py``: the handshake (``NBDMAGIC``, ``IHAVEOPT``, ``NBD_OPT_*``,
``NBD_REP_*``, ``NBD_INFO_*``), transmission (``NBD_CMD_*``, ``NBD_FLAG_*``,
``NBD_REPLY_TYPE_*``) and the ``base:allocation`` context's ``NBD_STATE_*`` bits.
Values only: no imports, nothing that acts."""

NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
NBD_REP_MAGIC = 0x3E889045565A9          # option replies
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0         # handshake flags
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0       # client flags
NBD_FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_ERR_UNSUP = (1 << 31) + 1
NBD_REP_ERR_POLICY = (1 << 31) + 2
NBD_REP_ERR_INVALID = (1 << 31) + 3
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5
NBD_REP_ERR_UNKNOWN = (1 << 31) + 6
NBD_REP_ERR_TOO_BIG = (1 << 31) + 9

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3

NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1

NBD_STATE_HOLE = 1 << 0                  # base:allocation
NBD_STATE_ZERO = 1 << 1

# error numbers ("Error values"): the wire values, whatever the host's errno says
NBD_EPERM = 1
NBD_EIO = 5
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75

BASE_ALLOCATION = "base:allocation"      # the meta context block status reports
