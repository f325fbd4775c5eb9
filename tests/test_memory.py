"""The worker's periodic full garbage collection frees cycles that long-lived connections left behind."""

from __future__ import annotations

import asyncio
import gc
import sys

from realtime.worker.memory import collect_garbage_forever


class Cycle:
    """Like a closed connection's transport: an object holding a bound method of itself."""

    def __init__(self) -> None:
        self.callback = self.close
        self.buffer = [object() for _ in range(10)]

    def close(self) -> None:
        pass


def test_garbage_cycles_are_collected_once_memory_grew_and_not_while_it_did_not():
    pauses: list[float] = []

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(collect_garbage_forever(pauses.append, interval=0.05))
        await asyncio.sleep(0.2)
        quiet = len(pauses)  # nothing grew yet: no pause
        gc.disable()  # as if generation 2 were far from its own trigger
        try:
            before = sys.getallocatedblocks()
            for _ in range(20_000):
                Cycle()  # unreachable at once, freed only by the collector
            assert sys.getallocatedblocks() > before * 1.05
            for _ in range(100):
                await asyncio.sleep(0.05)
                if pauses[quiet:]:
                    break
            after = sys.getallocatedblocks()
        finally:
            gc.enable()
            task.cancel()
        return quiet, after - before

    quiet, grown = asyncio.run(scenario())
    assert quiet == 0
    assert len(pauses) >= 1, "no full collection although memory grew"
    assert grown < 20_000, f"the cycles were not freed: {grown} blocks more"
