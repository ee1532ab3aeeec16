"""A checkpassword program for the tests, following the interface to the letter.

Reads `user NUL password NUL timestamp NUL` from descriptor 3 and, by user:
- alice with the password `wonderland`: runs the rest of its argv (success);
- tempfail: exits 111; noisy: says its password on stderr, then exits 111;
- slow: starts a child in its process group, reports both pids, and waits;
- anyone else: exits 1.
With CHECKPW_REPORT in the environment it first writes there, as JSON, what
it received: its uid, gid, groups, environment and the input in hex.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    data = b""
    while len(data) < 512:
        chunk = os.read(3, 512 - len(data))
        if not chunk:
            break
        data += chunk
    fields = data.split(b"\0")
    if len(fields) < 4 or len(argv := sys.argv[1:]) < 1:
        return 2
    user, password = fields[0].decode(), fields[1]
    report = os.environ.get("CHECKPW_REPORT")
    if report:
        with open(report, "w") as out:
            json.dump(
                {
                    "uid": os.getuid(),
                    "gid": os.getgid(),
                    "groups": os.getgroups(),
                    "env": dict(os.environ),
                    "input": data.hex(),
                    "fd3_after_eof": os.read(3, 1).hex(),
                },
                out,
            )
    if user == "alice" and password == b"wonderland":
        os.execvp(argv[0], argv)
    if user == "tempfail":
        return 111
    if user == "noisy":
        sys.stderr.write(f"backend down, password was {password.decode()}\n")
        return 111
    if user == "slow":
        child = subprocess.Popen(["sleep", "3600"])
        with open(os.environ["CHECKPW_PIDS"], "w") as out:
            out.write(f"{os.getpid()} {child.pid}\n")
        time.sleep(3600)
    return 1


if __name__ == "__main__":
    sys.exit(main())
