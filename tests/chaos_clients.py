"""Clients killed at random points: ``python tests/chaos_clients.py N MODEL_FILE SEED``.

Forks N children, one at a time; each connects to $TRIMS_SOCKET and opens, holds, pushes or
releases models; the parent SIGKILLs it after a random few milliseconds. This process is
single-threaded, so forking it is safe, and a fork costs a millisecond, so hundreds of
kills fit in seconds.
"""

import os
import random
import signal
import sys
import time

import trims


def child(model_file: str, rng: random.Random) -> None:
    client = trims.connect()
    views = []
    for _ in range(rng.randrange(1, 6)):
        action = rng.randrange(4)
        if action == 0:
            views.append(client.open("chaos/model"))
        elif action == 1:
            client.push(model_file, f"chaos/pushed-{rng.randrange(3)}")
        elif action == 2 and views:
            views.pop().close()
        else:
            client.list()
    time.sleep(1)  # hold whatever it has until killed


def main() -> None:
    count, model_file, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    for i in range(count):
        delay = rng.uniform(0, 0.02)
        child_seed = rng.randrange(2**32)
        pid = os.fork()
        if pid == 0:
            try:
                child(model_file, random.Random(child_seed))
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print("killed", count)


if __name__ == "__main__":
    main()
