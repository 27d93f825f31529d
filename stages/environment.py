"""Stage 'environment': write version.lock (the environment that produces the results).

    python stages/environment.py --params params.yaml --out version.lock

It runs first and checks, before any other stage writes or deletes anything,
everything about the run that can be known up front (virgo_exps.preflight,
the same checks as `virgo-exps check`): params.yaml, the params against the
active machine (nodes, processes, GPUs, the strategy's software, the device)
and the disk and memory the data needs. A refusal is one `error:` line,
followed by how to restore params.yaml when `dvc exp run -S` changed it.
"""

import argparse
from pathlib import Path

from virgo_exps import fsio, preflight
from virgo_exps.config import ConfigError
from virgo_exps.entry import stage_main
from virgo_exps.environment import collect, render


def _kept(out: Path, text: str) -> bool:
    """Whether ``out`` already holds ``text`` and is ours; a damaged, unreadable or foreign file is rewritten
    (the rename makes it ours), with one line for the last two."""
    try:
        why = fsio.trust_refusal(out)
        if not why:
            return out.read_bytes() == text.encode()  # a damaged file (not text) is rewritten
    except FileNotFoundError:
        return False
    except OSError as exc:
        why = f"it cannot be read ({exc.strerror})"
    print(f"environment: {out}: {why}; writing it again")
    return False


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        preflight.check(args.params)
    except ConfigError as exc:
        return preflight.refuse(exc, args.params)
    text = render(collect())
    if _kept(args.out, text):
        print(f"environment: {args.out} unchanged")
        return 0
    fsio.write_text(args.out, text)
    print(f"environment: wrote {args.out}")
    return 0


if __name__ == "__main__":
    stage_main(run)
