"""Regenerate the thesis's tables on the built-in testbeds, one command per chapter.

    python benchmarks/reproduce.py --list              # what each chapter reproduces
    python benchmarks/reproduce.py --chapter 6         # run chapter 6, print thesis vs rsgm
    python benchmarks/reproduce.py --chapter 4 -- --seeds 0 1 2   # arguments after -- go to the chapter

Each chapter lives in ``benchmarks/reproduce_ch<N>.py`` with a ``main(argv)`` that runs the
rows through the ``rsgm`` command (or the pillar's benchmark script) and prints, per table,
the thesis's number beside rsgm's (mean ± std over seeds where it trains). Rows that cannot
run here (ImageNet, Stable Diffusion, a GPU) are printed with the reason; their configs
exist and fail in one line without their data. ``docs/reproduction.md`` holds the tables
these commands printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAPTERS = {
    4: "SDI-GAN: Table 4.4.1 (synthetic 2-D) and the ZDC rows",
    5: "ExpertSim: Tables 5.4.2, 5.5.x (synthetic ZDC), with the Monte-Carlo row",
    6: "B4B: Table 6.4.1, Tables A.6.x, bucket and sybil ablations (digits testbed)",
    7: "LAION-mi: pitfall study and attacks on the built-in stand-ins",
    8: "CDI: min |P|, feature ablation, ROC over alpha, |U|/|P|, MIAs on the DI task",
    9: "IAR privacy: MIAs, dataset inference, extraction, IAR vs DM",
}


def load_chapter(chapter: int):
    path = HERE / f"reproduce_ch{chapter}.py"
    if not path.is_file():
        raise SystemExit(f"reproduce: chapter {chapter} has no script yet ({path.name}); chapters: {sorted(CHAPTERS)}")
    spec = importlib.util.spec_from_file_location(f"reproduce_ch{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", type=int, choices=sorted(CHAPTERS), help="the thesis chapter to reproduce")
    parser.add_argument("--list", action="store_true", help="list the chapters and what they reproduce")
    args = parser.parse_args(argv)
    if args.list or args.chapter is None:
        for number, what in CHAPTERS.items():
            ready = "" if (HERE / f"reproduce_ch{number}.py").is_file() else "  (no script yet)"
            print(f"chapter {number}: {what}{ready}")
        return 0
    return int(load_chapter(args.chapter).main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
