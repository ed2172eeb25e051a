"""``netshrink study``: run a study file, show or export its results.

    netshrink study STUDY.yaml --out DIR [--db PATH] [--workers N]
    netshrink study show DIR [--db PATH] [--csv FILE] [--all]
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from pathlib import Path

from netshrink.cli.args import subcommand
from netshrink.errors import UserError

VERBS = ("run", "show")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``study FILE ...`` is ``study run FILE ...`` (the verb may be left out)."""
    argv = list(argv)
    if len(argv) > 1 and argv[0] == "study" and argv[1] not in (*VERBS, "-h", "--help"):
        argv.insert(1, "run")
    return argv


def cmd_study_run(args: argparse.Namespace) -> int:
    from netshrink.study.execute import check_workers, run_study
    from netshrink.study.schema import load_study

    check_workers(args.workers, args.executor)  # before the study file is even read
    study = load_study(args.study)
    outcome = run_study(study, args.out, db=args.db, workers=args.workers,
                        executor=args.executor, address=args.address,
                        report=not args.no_report)
    print(f"study {study.name}: {len(outcome.ran)} cells run, {len(outcome.skipped)} "
          f"recorded before, {len(outcome.failed)} failed; results: {outcome.db}")
    for cell, error in outcome.failed.items():
        print(f"  failed: {cell}: {error}")
    return 1 if outcome.failed else 0


def cmd_study_show(args: argparse.Namespace) -> int:
    from netshrink.report.markdown import md_table
    from netshrink.study.report import read_study_record, recorded_db, study_content
    from netshrink.study.results import ResultsStore

    if args.all or args.csv:
        study = read_study_record(args.folder)
        db = args.db or recorded_db(args.folder, study)
        if args.csv:
            _check_csv_target(args.csv, args.folder, db)
        with ResultsStore(db, readonly=True) as store:  # read only: never written
            if args.csv:
                text, n = store.csv_text(study["name"])
            else:
                rows = store.rows(study["name"])
        if args.csv:
            _write_csv(args.csv, text)
            print(f"wrote {n} rows to {args.csv}")
            return 0
        print("| cell | stage | kind | runtime | top-1 % | size B | non-zero params | "
              "b1 p50 ms | img/s | noisy |")
        print("|:---|:---|:---|:---|---:|---:|---:|---:|---:|:---|")
        for r in rows:
            # a noisy timing gives no figure (the study's report says which and why)
            p50, rate = (("not measured",) * 2 if r["noisy"] else
                         (_num(r["latency_p50_ms"], 1, ".3f"),
                          _num(r["throughput_images_per_s"], 1, ",.0f")))
            print(f"| {r['cell']} | {r['stage']} | {r['kind']} | {r['runtime']} "
                  f"| {_num(r['top1'], 100, '.2f')} | {_num(r['size_bytes'], 1, ',')} "
                  f"| {_num(r['nonzero_params'], 1, ',')} | {p50} | {rate} "
                  f"| {'yes' if r['noisy'] else ''} |")
        return 0
    content = study_content(args.folder, args.db, with_plots=False)
    if content.lead:  # a compress search's headline: its test figure first
        print(content.lead)
    print(content.headline)
    print("\n".join(md_table(content.comparison)))
    return 0


# What a study writes in its folder: a CSV must not replace any of it.
def _check_csv_target(csv: Path, folder: Path, db: Path) -> None:
    """``--csv`` is a new file, or a CSV netshrink wrote: never a folder, the study's
    store or record, a file the study wrote, or any other existing file.

    Raises:
        UserError: naming the target and the fix.
    """
    from netshrink.store.layout import is_within
    from netshrink.store.outputs import check_output_file
    from netshrink.study.folder_walls import STUDY_OUTPUTS

    for name in STUDY_OUTPUTS:
        if is_within(csv, folder / name):
            raise UserError(f"--csv {csv}: lies in the study's own files ({name}), which "
                            "the CSV would replace; give another path")
    check_output_file(csv, flag="--csv", writes="a CSV netshrink wrote (the rows' header "
                      "first)", replaceable=_is_rows_csv,
                      inputs=[Path(f"{db}{suffix}") for suffix in ("", "-wal", "-shm",
                                                                   "-journal")])


def _is_rows_csv(path: Path) -> bool:
    """Whether ``path`` starts with the header ``study show --csv`` writes."""
    from netshrink.limits import open_regular
    from netshrink.study.results import COLUMNS

    header = ",".join(COLUMNS).encode()
    try:
        with open_regular(path, "CSV") as f:
            first = f.read(len(header) + 1)
    except (UserError, OSError):
        return False
    return first.startswith(header) and first[len(header):] in (b"\r", b"\n")


def _write_csv(csv: Path, text: str) -> None:
    from netshrink.store.atomic import atomic_write_text
    from netshrink.store.outputs import output_folder

    try:
        with output_folder(csv.parent):
            atomic_write_text(csv, text)
    except OSError as exc:
        raise UserError(f"--csv {csv}: cannot write it ({exc.strerror or exc}); give a "
                        "path you may write to") from None


def _num(value: float | None, scale: float, spec: str) -> str:
    return "–" if value is None else format(value * scale, spec)


def add_study(sub: argparse._SubParsersAction) -> None:
    """The ``study`` command and its verbs, on the main parser's subparsers."""
    p = subcommand(sub, "study", "run a study (a matrix of recipes) or show its results",
                   "netshrink study recipes/studies/fashion_finegrained_vs_channel.yaml "
                   "--out runs/study-fc",
                   "netshrink study show runs/study-fc",
                   "netshrink study show runs/study-fc --csv results.csv")
    p.description = textwrap.fill((p.description or "") + (
        " 'netshrink study FILE' is 'netshrink study run FILE'; 'netshrink study run --help' "
        "and 'netshrink study show --help' list each verb's options with their defaults "
        "(by default one worker, in this process)."), 88)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    run = subcommand(verbs, "run", "run (or resume) a study file",
                     "netshrink study run recipes/studies/fashion_nm_24.yaml --out runs/nm24",
                     "netshrink study run STUDY.yaml --out DIR --executor ray --workers 4")
    run.add_argument("study", type=Path, help="the study's .yaml file")
    run.add_argument("--out", type=Path, required=True,
                     help="the study's folder (cells/, study.json, the report)")
    run.add_argument("--db", type=Path,
                     help="results database to write (default: OUT/results.sqlite); "
                          "several studies may share one")
    run.add_argument("--workers", type=int, default=1,
                     help="cells run at once in a local process pool (timings of cells "
                          "that run side by side share the CPU)")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: this process, or a process pool with --workers > 1; "
                          "ray: cells as Ray tasks (pip install 'netshrink[ray]')")
    run.add_argument("--address",
                     help="with --executor ray: the cluster (auto, or ray://HOST:10001); "
                          "default: start a local one")
    run.add_argument("--no-report", action="store_true", help="skip the study report")
    run.set_defaults(fn=cmd_study_run)
    show = subcommand(verbs, "show", "the study's table, or its rows as CSV",
                      "netshrink study show runs/nm24",
                      "netshrink study show runs/nm24 --csv rows.csv")
    show.add_argument("folder", type=Path, help="the study's --out folder")
    show.add_argument("--db", type=Path, help="the results database, if not the study's")
    show.add_argument("--csv", type=Path, help="write every row (all columns) to this file")
    show.add_argument("--all", action="store_true",
                      help="every row of every cell (shared stages once per cell)")
    show.set_defaults(fn=cmd_study_show)

