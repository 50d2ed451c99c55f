"""Remote builders over SSH: targets and host keys, one OpenSSH connection, rsync, a remote
build followed line by line, and parallel dispatch.

`invoke remote-*` and `rebuild --remote` go through these modules; the fetch of a finished build
is a command of its own (pipeline.fetch) built on them.
"""
