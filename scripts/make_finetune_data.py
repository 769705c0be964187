"""Generates the default `lorajax finetune` dataset: word-order reversal.

Each example asks to reverse the order of 3 to 6 common English words; the
answer is checked by exact match. SmolLM2-135M-Instruct answers none of the
first 64 held-out prompts correctly (greedy decoding, measured with both
transformers and lorajax; it answers "The order of these words is: ..."
instead), and a rank-16 LoRA learns the task in a few dozen steps (0% -> ~94%
on 48 held-out prompts after 60 steps of 8), so the task shows what
fine-tuning does within minutes on a CPU.

The output is deterministic (fixed seed, no dependence on hash order): running
this script again rewrites byte-identical files. The held-out split shares no
word sequence with the training split.

Usage: python scripts/make_finetune_data.py [--out lorajax/data]
"""

import argparse
import json
import pathlib
import random

WORDS = (
    "apple river stone cloud green table music paper window garden silver"
    " yellow forest orange bread water light storm candle mirror horse"
    " winter summer bottle castle doctor engine finger island jacket kitten"
    " ladder market needle ocean pencil rabbit saddle ticket village wallet"
    " basket button carpet dragon feather hammer lemon monkey pillow rocket"
    " spider tiger violin wizard zebra coffee planet shadow"
).split()

PROMPT = "Reverse the order of these words: {}"


def make(n: int, rng: random.Random, seen: set) -> list[dict]:
  out = []
  while len(out) < n:
    words = rng.sample(WORDS, rng.randint(3, 6))
    key = tuple(words)
    if key in seen:
      continue
    seen.add(key)
    out.append({
        "prompt": PROMPT.format(" ".join(words)),
        "completion": " ".join(reversed(words)),
    })
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  root = pathlib.Path(__file__).resolve().parent.parent
  parser.add_argument("--out", default=str(root / "lorajax" / "data"))
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--eval", type=int, default=200)
  args = parser.parse_args()
  rng = random.Random(20250101)
  seen: set = set()
  # The held-out split is drawn first so that it never depends on --train.
  splits = {"eval": make(args.eval, rng, seen),
            "train": make(args.train, rng, seen)}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name, rows in splits.items():
    path = out / f"reverse_words_{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
  main()
