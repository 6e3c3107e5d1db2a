"""Write the text vocabulary of the `near-tiny` model config: the BPE tokens of the synthetic world.

    .venv/bin/python scripts/near_tiny_tokens.py

Rewrites the "tokenizer" field of near_ray/model/configs/near-tiny.json. The token embedding of a
model built from that config has one row per kept token (about 2,000 instead of 49,408), so its
weights are small enough to ship; any other text still tokenizes, spelled out in byte tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from near_ray.model.tokenizer import SubsetTokenizer, bpe_subset
from near_ray.sim.corpus import synthetic_texts

CONFIG = Path(__file__).resolve().parents[1] / "near_ray" / "model" / "configs" / "near-tiny.json"


def main() -> None:
    tokens = bpe_subset(synthetic_texts(), minimum_count=2)
    config = json.loads(CONFIG.read_text())
    config["tokenizer"] = {"bpe_subset": tokens}
    config["text_cfg"]["vocab_size"] = SubsetTokenizer(tokens, config["text_cfg"]["context_length"]).vocab_size
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in config.items()]  # one line per field
    CONFIG.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{CONFIG.name}: {len(tokens)} BPE tokens kept (plus 512 byte tokens and start/end of text)")


if __name__ == "__main__":
    main()
