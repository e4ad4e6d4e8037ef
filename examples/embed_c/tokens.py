"""Token ids for the C example, from the tokenizer the artifact carries (the C program takes and prints ids).

    python tokens.py encode ARTIFACT "text"     ids, space separated
    python tokens.py decode ARTIFACT ID ID ...  text
    python tokens.py eos ARTIFACT               the end-of-sequence id
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    command, artifact, *rest = argv
    tok = AutoTokenizer.from_pretrained(str(Path(artifact) / "tokenizer"), local_files_only=True,
                                        trust_remote_code=False)
    if command == "encode":
        print(" ".join(map(str, tok(" ".join(rest)).input_ids)))
    elif command == "decode":
        print(tok.decode([int(x) for x in rest], skip_special_tokens=True))
    else:  # -1: no end-of-sequence token (generate runs to --tokens)
        print(tok.eos_token_id if tok.eos_token_id is not None else -1)


if __name__ == "__main__":
    main(sys.argv[1:])
