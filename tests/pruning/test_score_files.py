"""External per-example score files (.npy, CSV and .npz keyed by file name) matched to an image folder the test
writes: exact and lenient matching, every error, and kdfast-prune --scores end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdfast.data import labels_fingerprint, load_dataset
from kdfast.pruning.score_files import ScoreFileError, load_score_file, match_scores
from kdfast.pruning.selection import prune

CLASSES = {"cat": 4, "dog": 3, "eel": 5}


@pytest.fixture()
def folder(tmp_path):
    from PIL import Image
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for cls, n in CLASSES.items():
        (root / cls).mkdir(parents=True)
        for k in range(n):
            img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
            img.save(root / cls / f"{cls}_{k}.png")
    data = load_dataset("folder", root=str(root))
    assert len(data.files) == sum(CLASSES.values())
    return root, data


def _scores_for(files):
    return {f: float(i) * 1.5 - 3 for i, f in enumerate(files)}  # distinct, known, in data set order


def _write_csv(path, rows, header="file,score"):
    path.write_text(header + "\n" + "".join(f"{k},{v}\n" for k, v in rows))
    return path


def test_csv_in_another_order_is_aligned_to_the_data_set(folder, tmp_path):
    _, data = folder
    truth = _scores_for(data.files)
    rows = list(truth.items())[::-1]
    got = load_score_file(str(_write_csv(tmp_path / "s.csv", rows)), files=data.files)
    np.testing.assert_array_equal(got, [truth[f] for f in data.files])


def test_npz_with_leading_folders_and_no_extensions_matches_leniently(folder, tmp_path):
    _, data = folder
    truth = _scores_for(data.files)
    keys = np.array([f"train/{f.rsplit('.', 1)[0]}" for f in truth])[::-1]
    np.savez(tmp_path / "s.npz", files=keys, scores=np.array(list(truth.values()))[::-1])
    got, report = load_score_file(str(tmp_path / "s.npz"), files=data.files, return_report=True)
    np.testing.assert_array_equal(got, [truth[f] for f in data.files])
    assert (report.exact, report.lenient, report.ignored) == (0, len(truth), 0)


def test_bare_file_names_and_extra_keys(folder):
    _, data = folder
    truth = _scores_for(data.files)
    keys = [f.split("/")[-1] for f in truth] + ["zebra/zebra_0.png"]
    got, report = match_scores(keys, [*truth.values(), 99.0], data.files)
    np.testing.assert_array_equal(got, [truth[f] for f in data.files])
    assert (report.lenient, report.ignored) == (len(truth), 1)


def test_unmatched_files_are_listed_with_their_count(folder, tmp_path):
    _, data = folder
    truth = _scores_for(data.files)
    rows = [(k, v) for k, v in truth.items() if k.startswith("cat/")]
    with pytest.raises(ScoreFileError, match=r"8 of 12 data set files have no score: 'dog/dog_0.png', "
                                             r"'dog/dog_1.png', .*'eel/eel_1.png', \.\.\. \(8 in all\)"):
        load_score_file(str(_write_csv(tmp_path / "s.csv", rows)), files=data.files)


def test_ambiguous_and_duplicate_keys_raise():
    files = ["a/x.png", "b/x.png", "a/y.png"]
    with pytest.raises(ScoreFileError, match="'x' fits several data set files .'a/x.png', 'b/x.png'."):
        match_scores(["x", "a/y.png"], [1.0, 2.0], files)
    with pytest.raises(ScoreFileError, match="files 'y' and 'a/y.jpg' both match data set file 'a/y.png'"):
        match_scores(["a/x.png", "b/x.png", "y", "a/y.jpg"], [1, 2, 3, 4], files)
    with pytest.raises(ScoreFileError, match="file './a/x.png' appears more than once"):
        match_scores(["a/x.png", "./a/x.png"], [1, 2], files)


def test_malformed_files_raise(tmp_path, folder):
    _, data = folder
    with pytest.raises(ScoreFileError,
                       match="needs a header with 'file' and 'score' columns, got \\['name', 'value'\\]"):
        load_score_file(str(_write_csv(tmp_path / "a.csv", [("x", 1)], header="name,value")), files=data.files)
    with pytest.raises(ScoreFileError, match="line 2: score 'high' is not a number"):
        load_score_file(str(_write_csv(tmp_path / "b.csv", [("x", "high")])), files=data.files)
    np.savez(tmp_path / "c.npz", names=np.array(["x"]), scores=np.array([1.0]))
    with pytest.raises(ScoreFileError, match="needs arrays 'files' and 'scores', got \\['names', 'scores'\\]"):
        load_score_file(str(tmp_path / "c.npz"), files=data.files)
    with pytest.raises(ScoreFileError, match="keyed by file name: pass the data set's files"):
        load_score_file(str(tmp_path / "b.csv"))
    with pytest.raises(ScoreFileError, match="does not exist"):
        load_score_file(str(tmp_path / "nope.npz"), files=data.files)


def test_npy_is_returned_as_stored(tmp_path):
    arr = np.arange(5, dtype=np.float32)
    np.save(tmp_path / "s.npy", arr)
    np.testing.assert_array_equal(load_score_file(str(tmp_path / "s.npy")), arr)


def test_prune_cli_with_a_keyed_csv(folder, tmp_path, capsys):
    from kdfast.cli.main import prune_main
    root, data = folder
    truth = _scores_for(data.files)
    csv_path = _write_csv(tmp_path / "mem.csv", [(f"pets/{k}", v) for k, v in truth.items()])
    out = tmp_path / "keep.npy"
    rc = prune_main(["--scores", str(csv_path), "--dataset", "folder", "--data-root", str(root), "--fraction", "0.5",
                     "--class-balanced", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = prune(np.array([truth[f] for f in data.files]), 0.5, "hard", labels=data.targets,
                     class_balanced=True).numpy()
    assert np.array_equal(np.load(out), expected)
    assert "matched 0 files exactly, 12 leniently" in captured.err
    record = json.loads((tmp_path / "keep.npy.json").read_text())
    assert record["dataset"] == "folder" and record["labels_fingerprint"] == labels_fingerprint(data.targets)
    rc = prune_main(["--scores", str(csv_path), "--fraction", "0.5", "--out", str(out)])
    assert rc == 2 and "keyed by file name: pass --dataset" in capsys.readouterr().err
    rc = prune_main(["--scores", str(csv_path), "--dataset", "digits", "--fraction", "0.5", "--out", str(out)])
    assert rc == 2 and "--dataset digits has no files" in capsys.readouterr().err
    rows = [(k, v) for k, v in truth.items() if k != "dog/dog_1.png"]
    rc = prune_main(["--scores", str(_write_csv(tmp_path / "m2.csv", rows)), "--dataset", "folder", "--data-root",
                     str(root), "--fraction", "0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "1 of 12 data set files have no score: 'dog/dog_1.png'" in err


def test_a_keyed_score_file_gives_the_keep_file_the_folders_names_and_labels(folder, tmp_path, capsys):
    # the keep file made from a keyed score file is tied to the folder's labels and to its files' names in their
    # order (the folder is listed without a stat: the scores were not computed from its bytes), checked like one
    # from kdfast-score, naming the files that differ
    from kdfast.cli.main import prune_main
    from kdfast.data import DataIdentityError, data_identity
    from kdfast.data.identity import file_names_fingerprint
    from kdfast.pruning.keep import read_keep
    root, data = folder
    csv_path = _write_csv(tmp_path / "mem.csv", list(_scores_for(data.files).items()))
    keep = tmp_path / "keep.npy"
    rc = prune_main(["--scores", str(csv_path), "--dataset", "folder", "--data-root", str(root), "--fraction", "0.5",
                     "--out", str(keep), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "keep.npy.json").read_text())
    full = data_identity(data)
    assert record["data"] == {**{k: v for k, v in full.items() if k != "files_fingerprint"},
                              "file_names_fingerprint": file_names_fingerprint(data.files)}
    assert (tmp_path / "keep.npy.files.txt").read_text().splitlines() == list(data.files)
    indices, _ = read_keep(str(keep), load_dataset("folder", root=str(root)))
    assert np.array_equal(indices, np.load(keep))
    (root / "dog" / "dog_1.png").write_bytes((root / "dog" / "dog_0.png").read_bytes() + b"more")  # same names
    assert np.array_equal(read_keep(str(keep), load_dataset("folder", root=str(root)))[0], np.load(keep))
    (root / "cat" / "cat_0.png").rename(root / "cat" / "cat_9.png")  # same labels, another file list
    with pytest.raises(DataIdentityError, match="file_names_fingerprint differ; 1 files gone: cat/cat_0.png; 1 new: "
                                                "cat/cat_9.png"):
        read_keep(str(keep), load_dataset("folder", root=str(root)))


def test_kdfast_prune_never_imports_torch_for_scores_in_files_and_folders(folder, tmp_path):
    # a keyed CSV matched to a folder, a score folder of that folder (class-balanced: the folder is listed to check
    # it) and a .npy: torch's import is most of the command's time at ImageNet scale; random and ccs, which draw
    # from torch's generator, do import it
    import subprocess
    import sys

    from kdfast.cli.main import score_main
    root, data = folder
    csv_path = _write_csv(tmp_path / "mem.csv", list(_scores_for(data.files).items()))
    np.save(tmp_path / "s.npy", np.arange(len(data.files), dtype=np.float32))
    assert score_main(["--dataset", "folder", "--data-root", str(root), "--method", "random", "--quiet", "--out",
                       str(tmp_path / "run")]) == 0
    probe = ("import sys; from kdfast.cli.main import main; rc = main(sys.argv[1:]); "
             "print('torch' in sys.modules); sys.exit(rc)")
    for scores, extra, torch_expected in (
            (csv_path, ["--dataset", "folder", "--data-root", str(root), "--class-balanced"], False),
            (tmp_path / "run", ["--class-balanced"], False),
            (tmp_path / "s.npy", ["--mode", "moderate"], False),
            (tmp_path / "s.npy", ["--mode", "random"], True)):
        run = subprocess.run([sys.executable, "-c", probe, "prune", "--scores", str(scores), *extra, "--fraction",
                              "0.5", "--out", str(tmp_path / "keep.npy"), "--quiet"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == str(torch_expected), (scores, extra)


def test_keys_never_match_across_class_folders(folder):
    _, data = folder
    truth = _scores_for(data.files)
    # every dog key renamed into a class folder that does not exist: they fit no file, whatever their names
    keys = [f.replace("dog/", "wolf/") for f in truth]
    with pytest.raises(ScoreFileError, match=r"3 of 12 data set files have no score: 'dog/dog_0.png'"):
        match_scores(keys, list(truth.values()), data.files)
    # a cat key under the dog folder never scores the cat file of the same name
    files = ["cat/0001.jpg", "dog/0002.jpg"]
    with pytest.raises(ScoreFileError, match=r"1 of 2 data set files have no score: 'cat/0001.jpg'"):
        match_scores(["dog/0001.jpg", "dog/0002.jpg"], [1.0, 2.0], files)
    # extra leading folders and bare names still match
    got, report = match_scores(["train/cat/0001", "0002.jpg"], [1.0, 2.0], files)
    assert got.tolist() == [1.0, 2.0] and (report.exact, report.lenient) == (0, 2)


def test_two_keys_on_one_file_are_an_error_even_when_one_matches_exactly(folder):
    _, data = folder
    truth = _scores_for(data.files)
    keys, values = list(truth), list(truth.values())
    with pytest.raises(ScoreFileError, match=r"files 'cat/cat_0.png' and 'cat/cat_0' both match data set file "
                                             r"'cat/cat_0.png'"):
        match_scores(keys + ["cat/cat_0"], values + [7.0], data.files)


def test_a_csv_with_a_utf8_bom_header_is_read(folder, tmp_path):
    _, data = folder
    truth = _scores_for(data.files)
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ("file,score\n" + "".join(f"{k},{v}\n" for k, v in truth.items())).encode())
    np.testing.assert_array_equal(load_score_file(str(path), files=data.files), [truth[f] for f in data.files])


def _reference_match(keys, values, files):
    """The matching before the vectorised rewrite, for valid inputs: exact normalised paths first, then the
    longest agreeing tail (a key's whole tail against any file tail, a shorter one against whole files)."""
    def parts(path, stem):
        p = [c for c in path.replace("\\", "/").split("/") if c not in ("", ".")]
        if stem and p:
            p[-1] = os.path.splitext(p[-1])[0]
        return tuple(p)
    position = {parts(f, False): i for i, f in enumerate(files)}
    out, pending = np.full(len(files), np.nan), []
    for k, v in zip(keys, values):
        i = position.get(parts(k, False))
        if i is None:
            pending.append((k, v))
        else:
            out[i] = v
    tails, whole = {}, {}
    for i, f in enumerate(files):
        p = parts(f, True)
        whole.setdefault(p, []).append(i)
        for s in range(len(p)):
            tails.setdefault(p[s:], []).append(i)
    for k, v in pending:
        p = parts(k, True)
        hits = next((h for s in range(len(p)) if (h := (whole if s else tails).get(p[s:]))), None)
        if hits is not None:
            out[hits[0]] = v
    return out


def test_a_keyed_csv_of_thousands_of_rows_keeps_what_the_former_matching_kept(tmp_path):
    from kdfast.data.identity import FileList
    rng = np.random.default_rng(3)
    files = FileList([f"n{c:03d}/n{c:03d}_{i}.JPEG" for c in range(40) for i in range(100)])
    labels = np.repeat(np.arange(40), 100)
    values = rng.normal(size=len(files)).round(6)
    order = rng.permutation(len(files))
    style = rng.integers(0, 5, len(files))
    keys = []
    for j in order:  # exact, './' and backslash forms, extra leading folders, bare names without extension
        f = files[j]
        keys.append([f, "./" + f, f.replace("/", "\\"), "train/" + f, os.path.splitext(f)[0]][style[j]])
    rows = list(zip(keys, values[order])) + [(f"n999/n999_{i}.JPEG", 5.0) for i in range(50)]  # other files
    path = _write_csv(tmp_path / "big.csv", rows)
    got, report = load_score_file(str(path), files=files, return_report=True)
    reference = _reference_match([k for k, _ in rows], [v for _, v in rows], list(files))
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(got, values)
    assert (report.exact, report.lenient, report.ignored) == ((style < 3).sum(), (style >= 3).sum(), 50)
    for mode in ("hard", "moderate", "ccs"):
        np.testing.assert_array_equal(prune(got, 0.3, mode, labels=labels, class_balanced=True).numpy(),
                                      prune(reference, 0.3, mode, labels=labels, class_balanced=True).numpy())
