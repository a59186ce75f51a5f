"""`kdfast-prune`: keep a fraction of a data set from its scores; writes the kept indices as .npy, or for keyed
sources (webdataset, Parquet) a keyed keep list (.parquet: key, index).

    kdfast-prune --scores runs/c100-el2n --fraction 0.3 --mode moderate --class-balanced --out keep.npy
    kdfast-prune --scores runs/wds-el2n --fraction 0.3 --out keep.parquet
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from kdfast.data.keys import example_keys, has_keys, key_positions
from kdfast.scoring.folder import labels_fingerprint_of, load_scores, read_scores_table, scores_identity
from kdfast.pruning.score_files import is_keyed
from kdfast.runtime.arrays import to_numpy
from kdfast.cli.common import CliError, UsageError, log

EPILOG = """examples:
  kdfast-prune --scores runs/digits-el2n --fraction 0.3 --out keep.npy
      kept 419 of 1397 examples (fraction 0.3, mode hard) -> keep.npy
  kdfast-prune --scores runs/c100-el2n --fraction 0.3 --mode moderate --class-balanced --out keep.npy
  kdfast-prune --scores scores.npy --fraction 0.1 --mode random --seed 3 --out keep.npy
  kdfast-prune --scores memorization.csv --dataset folder --data-root ~/data/pets --fraction 0.5 --out keep.npy
  kdfast-prune --scores runs/wds-el2n --fraction 0.3 --out keep.parquet
      (a keyed source: the kept examples' keys and indices, matched by key by kdfast-distill --keep)

--scores is a `kdfast-score` output folder (scores.npy + meta.json) or a .npy file of float scores in data
set order, higher = harder; or a score file keyed by file name (CSV with file,score columns, or .npz with
`files` and `scores`), matched to the files of --dataset folder|imagenet --data-root ROOT (see
kdfast/pruning/score_files.py for the matching rules). --class-balanced needs the labels: from --labels FILE.npy, or
from the data set (--dataset, else the one named in the scores' meta.json; a keyed source's score folder carries
them in scores.parquet's label column, so its shards are not reloaded); they must match the labels the
scores were computed on (fingerprint), and for image folders the same files (file-list fingerprint; the first
mismatched files are named). Besides OUT, OUT.json records what was kept and from what, including the scores'
data identity (for a keyed score file: the image folder it was matched to, whose file list goes to
OUT.files.txt), which kdfast-distill checks against its data.

Keyed sources (a score folder of a webdataset or Parquet source, or a bare scores.parquet with key and score
columns matched exactly to --dataset's example keys) give a keyed keep list: --out KEEP.parquet with columns
`key` and `index`, which kdfast-distill --keep and teacher caches match by key. --out .parquet also writes one
for any scores that carry keys (a folder holding scores.parquet).
"""


def add_parser(subparsers):
    from kdfast.pruning.selection import MODES
    p = subparsers.add_parser("prune", help="keep a fraction of a data set from its scores",
                              description="Keep a fraction of a data set from per-example scores.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Scores")
    g.add_argument("--scores", required=True, help="kdfast-score output folder, a .npy file of scores, or a .csv "
                                                   "/ .npz keyed by file name (needs --dataset, --data-root)")
    g = p.add_argument_group("Selection")
    g.add_argument("--fraction", type=float, required=True, help="share of examples kept, in (0, 1]")
    g.add_argument("--mode", default="hard", choices=MODES,
                   help="hard: highest scores; easy: lowest; moderate: around the median; random: seeded; "
                        "ccs: coverage-centric (default: %(default)s)")
    g.add_argument("--class-balanced", action="store_true", help="draw equally from each class")
    g.add_argument("--whole-batches", action="store_true",
                   help="LiPrune's batch pruning: keep the round(f * B) fixed batches with the largest scores, each "
                        "whole (needs a kdfast-score --method liprune folder, which holds batch_ids.npy)")
    g.add_argument("--seed", type=int, default=0, help="seed of random and ccs (default: %(default)s)")
    g.add_argument("--ccs-beta", type=float, default=0.1,
                   help="ccs: hardest share dropped before stratified sampling (default: %(default)s)")
    g.add_argument("--ccs-strata", type=int, default=50, help="ccs: number of score strata (default: %(default)s)")
    g = p.add_argument_group("Labels (for --class-balanced)")
    g.add_argument("--labels", help=".npy file of int labels in data set order")
    g.add_argument("--dataset", help="data set to read the labels from (default: the scores' meta.json)")
    g.add_argument("--data-root", help="root folder of the data set")
    g.add_argument("--split", default=None, help="split of the data set (default: meta.json's, else train)")
    g = p.add_argument_group("Output")
    g.add_argument("--out", required=True, help="where to write the kept indices (.npy, int64, sorted), or a keyed "
                                                "keep list (.parquet: key, index; needed for keyed sources)")
    return p


def _validate(args):
    problems = []
    if not 0.0 < args.fraction <= 1.0:
        problems.append(f"--fraction must be in (0, 1], got {args.fraction}")
    if not 0.0 <= args.ccs_beta < 1.0:
        problems.append(f"--ccs-beta must be in [0, 1), got {args.ccs_beta}")
    if args.ccs_strata < 1:
        problems.append(f"--ccs-strata must be >= 1, got {args.ccs_strata}")
    if not os.path.exists(args.scores):
        problems.append(f"--scores {args.scores} does not exist")
    if args.labels and not os.path.isfile(args.labels):
        problems.append(f"--labels {args.labels} does not exist")
    if args.whole_batches and (args.mode != "hard" or args.class_balanced):
        problems.append("--whole-batches keeps the batches with the largest scores: it goes with --mode hard and "
                        "without --class-balanced")
    if args.labels and args.dataset:
        problems.append("give --labels or --dataset, not both")
    if not args.out.endswith((".npy", ".parquet")):
        problems.append(f"--out must name a .npy file (or a .parquet keyed keep list), got {args.out}")
    problems += _out_problems(args)
    if problems:
        raise UsageError("; ".join(problems))


def _out_problems(args) -> list[str]:
    """--out and the files written beside it must overwrite no input and land in no job's folder."""
    from kdfast.io.job import enclosing_job
    written = {os.path.realpath(p): p for p in (args.out, f"{args.out}.json", f"{args.out}.files.txt",
                                                f"{args.out}.files.txt.stat.npy")}
    inputs = [("--labels", args.labels)] if args.labels else []
    if os.path.isdir(args.scores):
        inputs += [("--scores", os.path.join(args.scores, name)) for name in os.listdir(args.scores)]
    else:
        inputs += [("--scores", args.scores), ("--scores", f"{args.scores}.json")]
    problems = [f"--out {args.out} would overwrite the input {flag} file {path}; write the keep file elsewhere"
                for flag, path in inputs if os.path.realpath(path) in written]
    holder = enclosing_job(os.path.dirname(os.path.abspath(args.out)))
    if holder is not None and not problems:
        problems.append(f"--out {args.out} lies inside the kdfast run folder {holder}, whose files belong to that "
                        "run; write the keep file elsewhere")
    return problems


def _load_npy(path, what):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {what} {path}: {exc}") from None


def _keyed_scores(args):
    """(data set, scores in its order, meta) of a CSV / .npz / .parquet keyed by file name (an image folder, listed
    by name alone: data/folder_listing.py) or by example key (keyed sources: exact match); meta carries the data
    set's identity (labels and file-list fingerprints), so the keep file is checked against the data."""
    from kdfast.data import IMAGE_FOLDERS, data_identity
    if not args.dataset:
        raise UsageError(f"--scores {args.scores} is keyed by file name: pass --dataset (folder or imagenet) and "
                         "--data-root to match it to the data set's files")
    if args.dataset.lower() in IMAGE_FOLDERS:
        data, scores = _scores_by_file(args)
    else:
        data = _keyed_source(args)
        scores = _scores_by_key(args, data)
    identity = data_identity(data)
    return data, scores, {"dataset": args.dataset, "data_root": args.data_root, "split": args.split or "train",
                          "labels_fingerprint": identity["labels_fingerprint"], "data": identity}


def _scores_by_file(args):
    """(the image folder's listing, its files' scores matched by file name: kdfast/pruning/score_files.py); the
    score file is read in a forked child while the folder is listed (runtime/forked.py)."""
    from kdfast.data import list_image_folder
    from kdfast.pruning.score_files import match_scores, read_score_file
    from kdfast.runtime.forked import Forked
    reading = Forked(read_score_file, args.scores)
    try:
        data = list_image_folder(args.dataset, root=args.data_root, split=args.split or "train")
        keys, values = reading.result()
    finally:
        reading.close()
    scores, report = match_scores(keys, values, data.files, source=f"score file {args.scores}")
    log(f"matched {report.exact} files exactly, {report.lenient} leniently; {report.ignored} score entries "
        "match no file", quiet=args.quiet)
    return data, scores


def _keyed_source(args):
    """--dataset (a webdataset or Parquet source), whose examples a score file is matched to by key."""
    from kdfast.data import load_dataset
    data = load_dataset(args.dataset, root=args.data_root, split=args.split or "train")
    if not has_keys(data):
        raise UsageError(f"--scores {args.scores} is keyed by file name but --dataset {args.dataset} has no files; "
                         "keyed score files go with image folders (folder, imagenet) and keyed sources")
    return data


def _scores_by_key(args, data):
    """The scores of a keyed source's examples from a scores.parquet, every example found by its exact key
    (keys of other examples are ignored)."""
    if not args.scores.lower().endswith(".parquet"):
        raise UsageError(f"--scores {args.scores}: scores of a keyed source (--dataset {args.dataset}) are matched "
                         "by example key from a .parquet with key and score columns (kdfast-score's scores.parquet)")
    keys, values = read_scores_table(args.scores)
    rows = key_positions(example_keys(data), keys, what=f"--dataset {args.dataset} ({len(data)} examples)",
                         among=f"score file {args.scores}")
    log(f"matched all {len(rows)} examples by key; {len(keys) - len(rows)} score entries match no example",
        quiet=args.quiet)
    return values[rows]


def _score_keys(args, meta, n, keyed_data):
    """Every example's key (a pyarrow string array) for a keyed keep list: the data set's a keyed score file
    was matched to, else those in the score folder's scores.parquet; None when the scores carry none."""
    if keyed_data is not None:
        return example_keys(keyed_data)
    table = os.path.join(args.scores, "scores.parquet") if os.path.isdir(args.scores) else None
    if table is None or not os.path.isfile(table):
        if meta.get("keyed"):
            raise CliError(f"--scores {args.scores} is of a keyed source but holds no scores.parquet; score it again")
        return None
    keys, _ = read_scores_table(args.scores)
    if len(keys) != n:
        raise CliError(f"{table} holds {len(keys)} rows but scores.npy {n} scores; the folder is damaged")
    return keys


def _labels(args, meta, n, dataset=None):
    """The labels of --class-balanced; `dataset`: the data set keyed scores were matched to (already checked)."""
    whole = False  # a data set is checked whole against the scores' identity, a labels file or column for its labels
    if args.labels:
        labels = _load_npy(args.labels, "labels")
        source = args.labels
    elif dataset is None and not args.dataset and meta.get("keyed") and os.path.isdir(args.scores):
        # a keyed source's folder carries them: no reload of its shards, which may need the score run's source
        # options (--label-column, ...) or have moved since
        labels, source = _table_labels(args.scores), os.path.join(args.scores, "scores.parquet")
    else:
        name = args.dataset or meta.get("dataset")
        if not name:
            raise UsageError("--class-balanced needs labels: pass --labels FILE.npy or --dataset (the scores carry "
                             "no meta.json naming their data set)")
        split = args.split or meta.get("split") or "train"
        if dataset is None:
            dataset = _scores_dataset(args, meta, name, split)
        labels, whole = to_numpy(dataset.targets), True
        source = f"{name} ({split})"
    if labels.ndim != 1 or len(labels) != n:
        raise CliError(f"labels from {source} have shape {labels.shape}, expected ({n},) (one per score)")
    if not whole:
        from kdfast.data import check_identity
        identity = {"labels_fingerprint": labels_fingerprint_of(meta)} if labels_fingerprint_of(meta) else None
        check_identity(identity, labels, what=f"--scores {args.scores}",
                       hint=f"check --labels {args.labels}" if args.labels else f"check {source}")
    return labels


def _table_labels(folder):
    """The `label` column of a keyed score folder's scores.parquet (int64)."""
    from kdfast.data.keys import import_pyarrow
    import_pyarrow("--class-balanced on a keyed score folder")
    import pyarrow.parquet as pq
    table = os.path.join(folder, "scores.parquet")
    try:
        column = pq.read_table(table, columns=["label"]).column("label")
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(f"--class-balanced: cannot read the labels of {table} ({exc}); score it again, or pass "
                       "--labels FILE.npy or --dataset") from None
    return column.to_numpy().astype(np.int64)


def _scores_dataset(args, meta, name, split):
    """The data set named for the labels, checked against the data identity the scores were computed on."""
    from kdfast.data import IMAGE_FOLDERS, check_identity, list_image_folder, load_dataset
    from kdfast.io.job import read_file_list
    limit, root = meta.get("limit"), args.data_root or meta.get("data_root")
    if str(name).lower() in IMAGE_FOLDERS and not limit:  # listed with its stats (its identity), no torch
        dataset = list_image_folder(name, root=root, split=split, stat=True)
    else:
        dataset = load_dataset(name, root=root, split=split)
    if limit and limit < len(dataset):
        from kdfast.data import LabeledSubset
        dataset = LabeledSubset(dataset, range(limit))
    identity, files = scores_identity(args.scores, meta)
    if identity and "num_examples" in identity and identity["num_examples"] != len(dataset):
        raise CliError(f"--scores {args.scores} holds {identity['num_examples']} scores but {name} ({split}) has "
                       f"{len(dataset)} examples: check --dataset, --data-root and --split")
    check_identity(identity, dataset, what=f"--scores {args.scores}",
                   recorded_files=read_file_list(files) if files else None,
                   hint="check --dataset, --data-root and --split")
    return dataset


def _whole_batches(args, scores):
    """LiPrune's batch pruning: dataset indices of the round(f * B) batches with the largest scores."""
    import torch

    from kdfast.scoring.liprune import keep_top_batches
    path = os.path.join(args.scores, "batch_ids.npy")
    if not os.path.isfile(path):
        raise UsageError(f"--whole-batches: {args.scores} holds no batch_ids.npy; score with kdfast-score --method "
                         "liprune first")
    batch_ids = _load_npy(path, "batch ids")
    if batch_ids.shape != scores.shape or not np.issubdtype(batch_ids.dtype, np.integer):
        raise CliError(f"{path}: expected {scores.shape[0]} integer batch ids, got {batch_ids.dtype} "
                       f"{batch_ids.shape}")
    return keep_top_batches(torch.from_numpy(scores), torch.from_numpy(batch_ids.astype(np.int64)),
                            args.fraction).numpy(), int(batch_ids.max()) + 1


PER_CLASS_LISTED = 20  # more classes than this: the kept counts summarised, not listed on one line


def _per_class_line(counts) -> str:
    """The kept examples per class: each class's count for a few classes, else their spread."""
    if len(counts) <= PER_CLASS_LISTED:
        return "per class: " + ", ".join(f"{c}: {k}" for c, k in enumerate(counts.tolist()) if k)
    low, high = int(counts.argmin()), int(counts.argmax())
    return (f"per class ({len(counts)} classes): min {counts[low]} (class {low}), median {np.median(counts):g}, "
            f"max {counts[high]} (class {high})")


def run(args) -> int:
    from kdfast.pruning.selection import keep_indices
    _validate(args)
    if is_keyed(args.scores) and not os.path.isdir(args.scores):
        keyed, scores, meta = _keyed_scores(args)
    else:
        keyed, (scores, meta) = None, load_scores(args.scores)
    if scores.ndim != 1:
        raise CliError(f"scores in {args.scores} have shape {scores.shape}, expected (N,)")
    labels = _labels(args, meta, len(scores), keyed) if args.class_balanced else None
    num_batches = None
    if args.whole_batches:
        keep, num_batches = _whole_batches(args, scores)
    else:
        keep = keep_indices(scores, args.fraction, args.mode, labels=labels, class_balanced=args.class_balanced,
                            seed=args.seed, ccs_beta=args.ccs_beta, ccs_strata=args.ccs_strata)
    from kdfast.pruning.keep import is_keyed_keep, write_keep, write_keep_digests
    from kdfast.scoring.folder import score_digests
    keyed_source = bool(meta.get("keyed")) or (keyed is not None and has_keys(keyed))
    keys = _score_keys(args, meta, len(scores), keyed) if keyed_source or is_keyed_keep(args.out) else None
    if keyed_source and not is_keyed_keep(args.out):
        raise UsageError(f"--scores {args.scores} is of a keyed source (webdataset, Parquet), whose subsets are found "
                         f"by key: write a keyed keep list, --out {os.path.splitext(args.out)[0]}.parquet")
    if keys is None and is_keyed_keep(args.out):
        raise UsageError(f"--out {args.out}: a keyed keep list needs the examples' keys: --scores a kdfast-score "
                         "folder holding scores.parquet, or a keyed score file")
    identity, files = scores_identity(args.scores, meta)
    if identity is None:
        log(f"note: --scores {args.scores} carries no data identity (no meta.json), so {args.out} cannot be checked "
            "against the data it is used with", quiet=args.quiet)
    record = {"num_examples": int(len(scores)), "num_kept": int(len(keep)), "fraction": args.fraction,
              "mode": args.mode, "class_balanced": args.class_balanced, "seed": args.seed,
              "scores": os.path.abspath(args.scores), "method": meta.get("method"), "dataset": meta.get("dataset"),
              "labels_fingerprint": labels_fingerprint_of(meta), "data": identity, "files_list": files,
              "argv": sys.argv}
    if num_batches is not None:
        record.update(whole_batches=True, num_batches=num_batches)
    if args.mode == "ccs":
        record.update(ccs_beta=args.ccs_beta, ccs_strata=args.ccs_strata)
    if keys is not None:
        record["keyed"] = True  # the keep list's keys find its examples, in any subset or order of the source
    if keys is None and keyed is None:  # the bytes the scores were read from (by position), for the keep file's users
        record.update(write_keep_digests(args.out, score_digests(args.scores, meta)))
    write_keep(args.out, keep, record, files=None if keyed is None else keyed.files, keys=keys)
    print(f"kept {len(keep)} of {len(scores)} examples (fraction {args.fraction}, mode {args.mode}"
          f"{', class-balanced' if args.class_balanced else ''}"
          f"{f', whole batches of {num_batches}' if num_batches else ''}) -> {args.out}")
    kept = scores[keep]
    finite = kept[np.isfinite(kept)]
    if finite.size:
        print(f"kept scores: min {finite.min():.4g}, median {np.median(finite):.4g}, max {finite.max():.4g}"
              f"{f', {int((~np.isfinite(kept)).sum())} at +inf' if finite.size < kept.size else ''}")
    if labels is not None:
        print(_per_class_line(np.bincount(labels[keep], minlength=int(labels.max()) + 1)))
    log(f"wrote {args.out} and {args.out}.json", quiet=args.quiet)
    return 0


if __name__ == "__main__":
    from kdfast.cli.main import prune_main
    sys.exit(prune_main())
