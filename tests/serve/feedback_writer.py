"""Appends feedback records in a bounded loop, printing each id once ``append`` has returned (flushed): the
child process of the SIGKILL tests in tests/serve/test_feedback.py.

Usage: python -m tests.serve.feedback_writer PATH COUNT [STALL_AFTER]

It prints ``open <n>`` (the records it found) first, then one id per confirmed append. With STALL_AFTER, the
append after that many confirmed ones writes half of its line, prints ``stalled`` and sleeps (at most
30 s), as a slow disk would: the test kills it there, inside a line, for certain. Without it a whole line is
one ``os.write``, which a kill does not cut on a local file system, so the kill lands between or around
writes and fsyncs.
"""

from __future__ import annotations

import os
import sys
import time

from jaxalign.serve.feedback import ACTIONS, Choice, FeedbackRecord, FeedbackStore

# Long answers (about 13 KB a line) make each write span several pages.
FILLER = "The sky looks blue because air scatters short wavelengths more. " * 200
STALL_S = 30


def record(index: int) -> FeedbackRecord:
    action = ACTIONS[index % len(ACTIONS)]
    extra = {}
    if action == "edit":
        extra["edit"] = f"edited {index}: {FILLER}"
    if action == "pick":
        extra["choice"] = Choice(responses=(f"A {index} {FILLER}", f"B {index}"), chosen=index % 2)
    else:
        extra["response"] = f"answer {index}: {FILLER}"
    return FeedbackRecord(prompt=f"question {index}?", action=action, model_version="v0", **extra)


def stall_next_write(fd: int) -> None:
    """Make the next write on ``fd`` write half its bytes, then report and sleep (to be killed)."""
    write = os.write

    def half_then_stall(target, data):
        if target != fd:
            return write(target, data)
        written = write(target, bytes(memoryview(data)[: len(data) // 2]))
        print("stalled", flush=True)
        time.sleep(STALL_S)
        return written

    os.write = half_then_stall


def main(path: str, count: int, stall_after: int | None = None) -> None:
    store = FeedbackStore(path)
    print("open", len(store), flush=True)
    for index in range(count):
        if index == stall_after:
            stall_next_write(store._fd)
        item = record(index)
        store.append(item)
        print(item.id, flush=True)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
