"""How the replies fail as more is removed: each reply of the retrieval tasks (needle, multikey,
multivalue, vartrack) sorted into one kind, per method and ratio (placements after and agnostic, all lengths).

    python results/grid_gpu/failures.py
"""

import collections
import json
import re

from combine import FOLDERS, HERE

KINDS = ["right", "partial", "loop", "wrong"]
RETRIEVAL = {"needle", "multikey", "multivalue", "vartrack"}


def kind(row) -> str:
    """right: every answer in the reply; partial: a 2+ character prefix of a missing answer is in it
    (the code's first characters kept, the rest lost); loop: one word or number said 5+ times in a
    row (a degenerate repetition); wrong: anything else (an answer from elsewhere, off the task)."""
    reply = row["reply"]
    missing = [a for a in row["answers"] if a.lower() not in reply.lower()]
    if not missing:
        return "right"
    words = re.findall(r"\w+", reply.lower())
    if any(len(set(words[i : i + 5])) == 1 for i in range(len(words) - 4)):
        return "loop"
    if any(re.search(re.escape(a[:k]), reply) for a in missing for k in range(len(a) - 1, 1, -1)):
        return "partial"
    return "wrong"


def main():
    counts = collections.defaultdict(collections.Counter)
    for folder, labels in FOLDERS.items():
        for line in open(HERE / folder / "results.jsonl"):
            row = json.loads(line)
            if row["task"] not in RETRIEVAL or labels[row["method"]] == "full" or row["placement"] == "streamed":
                continue
            counts[(labels[row["method"]], row["ratio"])][kind(row)] += 1
    print("| method | removed | replies | " + " | ".join(KINDS) + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    for (label, ratio), c in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        total = sum(c.values())
        print(f"| {label} | {ratio:.2f} | {total} | " + " | ".join(f"{100 * c[k] / total:.0f}%" for k in KINDS) + " |")


if __name__ == "__main__":
    main()
