"""Count file opens under folders with Linux inotify (IN_OPEN), whoever opens them (DALI's C++ threads too)."""

from __future__ import annotations

import ctypes
import os
import struct
from collections import Counter

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


class OpenCounter:
    def __init__(self, folders):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch failed for {folder}")
            self.dirs[wd] = folder
        self.opens = Counter()

    def poll(self) -> Counter:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.opens
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0").decode()
                pos += _EVENT.size + length
                if mask & IN_OPEN and name:
                    self.opens[os.path.join(self.dirs[wd], name)] += 1

    def close(self):
        os.close(self.fd)


def available() -> bool:
    try:
        OpenCounter([]).close()
        return True
    except (OSError, AttributeError):
        return False
