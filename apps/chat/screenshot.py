"""Take an SVG screenshot of a real conversation (used for docs/chat.svg).

    python -m apps.chat.screenshot /work/programs/smollm2-f32 docs/chat.svg \\
        "What is the capital of France?" "Write a Python function that reverses a string."

Runs the app headless, sends each prompt in turn, waits for the reply and saves the
screen; prints each turn's statistics (how many tokens were prefilled, speed, latency).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from apps.chat.app import ChatApp
from apps.chat.mlx_thread import MLXThread
from apps.chat.widgets import PromptInput


async def take(program: str, out: Path, prompts: list[str], size: tuple[int, int], max_tokens: int) -> None:
    mlx_thread = MLXThread()
    try:
        prog = mlx_thread.load(program)
        app = ChatApp(prog, mlx_thread, max_tokens=max_tokens)
        async with app.run_test(size=size) as pilot:
            for prompt in prompts:
                app.query_one(PromptInput).text = prompt
                await pilot.press("enter")
                await pilot.pause()
                await app.workers.wait_for_complete()
                await pilot.pause(0.5)
                s = app.session
                print(f"{prompt!r}: prefilled {s.prefilled} of {s.prompt_tokens} prompt tokens, "
                      f"generated {s.generated}, ttft {s.stats.ttft * 1000:.0f} ms, "
                      f"{s.stats.generation_tps:.1f} tok/s, context {s.context_used}", file=sys.stderr)
            app.refresh_status()
            await pilot.pause()
            app.save_screenshot(filename=out.name, path=str(out.parent))
    finally:
        mlx_thread.shutdown()


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__)
    program, out, *prompts = argv
    asyncio.run(take(program, Path(out), prompts, size=(100, 36), max_tokens=160))


if __name__ == "__main__":
    main(sys.argv[1:])
