"""Starts the walk of an image folder a command will load before the command imports torch (runtime/walk_prefetch.py):
the arguments that name the folder are read from the raw command line, without the command's parser (building it
imports the models, hence torch). Anything this pre-parse cannot place (abbreviated flags, --help, shards) starts
nothing: the data set is then walked in-process, as always."""
from __future__ import annotations

import argparse
import os


def prefetch_folder_walk(argv) -> bool:
    """True when the walk of the image folder `argv` (kdfast-score's arguments) names was started."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--split", default="train")
    try:
        args, _ = parser.parse_known_args(argv)
    except SystemExit:  # e.g. a flag without its value: the command's own parser says so
        return False
    from kdfast.data import IMAGE_FOLDERS  # torch-free: its data set classes load on first use
    key = args.dataset.lower()
    if key not in IMAGE_FOLDERS or not args.data_root or {"-h", "--help"} & set(argv):
        return False
    from kdfast.runtime.folder_walk import image_folder_of
    from kdfast.runtime.walk_prefetch import prefetch_walk
    folder, layout = image_folder_of(key, os.path.expanduser(args.data_root), args.split)
    return prefetch_walk(folder, key, layout)
