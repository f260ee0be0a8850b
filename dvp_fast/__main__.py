"""python -m dvp_fast {train,sample,eval,export,distill,figures,upgrade-checkpoint} ...: the command-line tools, also
without their scripts on PATH; upgrade-checkpoint rewrites trusted format-1 checkpoints in format 2."""
import sys

from .checkpoint import upgrade_main
from .cli import eval_main, sample_main
from .distill_cli import distill_main
from .export import export_main
from .figures_cli import figures_main
from .train_cli import main as train_main

COMMANDS = {"train": train_main, "sample": sample_main, "eval": eval_main, "export": export_main,
            "distill": distill_main, "figures": figures_main, "upgrade-checkpoint": upgrade_main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m dvp_fast {{{','.join(COMMANDS)}}} [options] (e.g. python -m dvp_fast train --help)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
