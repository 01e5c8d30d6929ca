"""Writes examples/data/dates.jsonl: sentences with a date in many styles, and the date as YYYY-MM-DD.

The instruction-tuning data of examples/smollm2_chat.toml; a fixed seed, so the file is the same every time:
    .venv/bin/python examples/dates_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
EVENTS = ["The meeting was moved to {d}.", "Her flight leaves on {d}, early in the morning.",
          "We signed the lease on {d}.", "The library reopens {d} after the renovation.",
          "Invoices sent after {d} are paid next quarter.", "On {d} the team shipped version two.",
          "The concert, first planned for spring, now takes place on {d}.", "My grandmother was born {d}.",
          "Registration closes {d} at noon.", "The bridge opened to traffic on {d}."]  # fmt: skip
INSTRUCTION = "Write the date in this sentence as YYYY-MM-DD, and nothing else.\n\n"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _styles(day: int, month: int, year: int) -> list[str]:
    name = MONTHS[month - 1]
    return [f"{name} {day}, {year}", f"{day} {name} {year}", f"the {_ordinal(day)} of {name} {year}",
            f"{name} {_ordinal(day)}, {year}", f"{name[:3]}. {day}, {year}"]  # fmt: skip


def main(n: int = 320, seed: int = 0) -> None:
    rng = random.Random(seed)
    out = Path(__file__).with_name("data") / "dates.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("w") as f:
        for _ in range(n):
            year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
            sentence = rng.choice(EVENTS).format(d=rng.choice(_styles(day, month, year)))
            row = {"prompt": INSTRUCTION + sentence, "answer": f"{year:04d}-{month:02d}-{day:02d}"}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
