"""Submission intake: what is accepted, and every refusal with its specific message.

Each refusal must name the problem, list every problem at once, and leave no job and no files
behind in the store.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from robustbench_alm.jobs.archive import SubmissionError, tree_sha256, unpack
from robustbench_alm.jobs.store import JobStore, submissions_folder
from robustbench_alm.jobs.submission import validate
from robustbench_alm.jobs.worker import submit
from tests.jobhelpers import make_submission, train_cnn_small, write_metadata


@pytest.fixture(scope="module")
def cnn_state(fmnist_train):
    x, y = fmnist_train
    return train_cnn_small(x[:1200], y[:1200]).state_dict()


@pytest.fixture
def good(tmp_path, cnn_state):
    return make_submission(tmp_path / "good", cnn_state)


def _store(tmp_path: Path) -> Path:
    return tmp_path / "store" / "store.sqlite"


def _refused(tmp_path: Path, source: Path, *patterns: str, **limits) -> SubmissionError:
    """Submit ``source``, expect a refusal matching every pattern, and nothing left over."""
    store = _store(tmp_path)
    with pytest.raises(SubmissionError) as info:
        submit(source, store, suite="quick", n_examples=10, **limits)
    text = str(info.value)
    for pattern in patterns:
        assert pattern in text, f"{pattern!r} not in:\n{text}"
    assert "nothing was queued" in text
    if store.exists():
        with JobStore(store) as s:
            assert s.jobs() == []
    assert list(submissions_folder(store).iterdir()) == []  # no partial unpack kept
    return info.value


def _tar(path: Path, files: dict[str, bytes], extra=()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- accepted ------------------------------------------------------------------------------

def test_folder_zip_and_tar_hash_the_same_and_queue_once(tmp_path, good):
    with tarfile.open(tmp_path / "sub.tar.gz", "w:gz") as tar:
        tar.add(good, arcname="good")  # members under one top folder
    with zipfile.ZipFile(tmp_path / "sub.zip", "w") as z:  # members at the root
        for name, data in _files(good).items():
            z.writestr(name, data)
    hashes = {tree_sha256(unpack(src, tmp_path / f"u{i}"))
              for i, src in enumerate([good, tmp_path / "sub.tar.gz", tmp_path / "sub.zip"])}
    assert hashes == {tree_sha256(good)}

    store = _store(tmp_path)
    first = submit(good, store, suite="quick", n_examples=10)
    again = submit(tmp_path / "sub.tar.gz", store, suite="quick", n_examples=10)
    other = submit(tmp_path / "sub.zip", store, suite="pgd-20", n_examples=10)
    assert first.created and not again.created and other.created
    assert again.job_id == first.job_id and other.job_id != first.job_id
    assert first.sha256 == again.sha256 == other.sha256
    assert sorted(p.name for p in submissions_folder(store).iterdir()) == [first.sha256]


def test_state_dict_pickle_loads_with_weights_only(tmp_path, cnn_state):
    folder = tmp_path / "pt"
    folder.mkdir()
    torch.save(cnn_state, folder / "model.pt")
    write_metadata(folder)
    sub = validate(folder)
    assert sub.loaded.weights_format == "pt"
    assert torch.equal(sub.loaded.model.state_dict()["fc2.bias"], cnn_state["fc2.bias"])


def test_link_inside_is_kept_as_a_copy(tmp_path, good):
    files = _files(good) | {"README.md": b"how this model was trained\n"}
    link = tarfile.TarInfo("NOTES.md")
    link.type, link.linkname = tarfile.SYMTYPE, "README.md"
    root = unpack(_tar(tmp_path / "s.tar.gz", files, [link]), tmp_path / "out")
    notes = root / "NOTES.md"
    assert not notes.is_symlink() and notes.read_bytes() == files["README.md"]
    validate(root)


def test_torch_export_program_is_accepted_and_its_pickles_vetted(tmp_path, cnn_state):
    from robustbench_alm.models import create_model

    model = create_model("cnn-small")
    model.load_state_dict(cnn_state)
    program = torch.export.export(model.eval(), (torch.rand(2, 1, 28, 28),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    folder = tmp_path / "export"
    folder.mkdir()
    torch.export.save(program, folder / "model.pt2")
    write_metadata(folder, architecture="cnn-small (torch.export)")
    sub = validate(folder)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(sub.loaded.model(x), model(x), atol=1e-5)

    # The same archive with its sample inputs replaced by a pickle that runs code: the stock
    # torch.export.load falls back to weights_only=False for them, so it would run it.
    marker = tmp_path / "ran"
    evil_folder = tmp_path / "evil-export"
    evil_folder.mkdir()
    shutil.copy(folder / "submission.toml", evil_folder)
    buffer = io.BytesIO()
    torch.save((_RunsCode(str(marker)),), buffer)
    with zipfile.ZipFile(folder / "model.pt2") as src, \
            zipfile.ZipFile(evil_folder / "model.pt2", "w") as dst:
        for info in src.infolist():
            evil = info.filename.endswith("data/sample_inputs/model.pt")
            dst.writestr(info, buffer.getvalue() if evil else src.read(info))
    _refused(tmp_path, evil_folder, "member 'data/sample_inputs/model.pt' is a pickle that "
             "needs code to load")
    assert not marker.exists()


def test_timm_architecture(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is optional: pip install "
                                              "'robustbench-alm[timm]'")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
    folder = make_submission(tmp_path / "timm", model.state_dict(),
                             architecture="timm:test_resnet")
    assert validate(folder).loaded.architecture == "timm:test_resnet"
    write_metadata(folder, architecture="timm:no_such_model")
    _refused(tmp_path, folder, "timm has no model 'no_such_model'")


# --- refused: weights ----------------------------------------------------------------------

class _RunsCode:
    """Pickles as a call to open(path, "w"): loading it would create the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"conv1.weight": _RunsCode(str(marker))}, f)
    write_metadata(folder)
    _refused(tmp_path, folder, "weights 'model.pt': refused, the pickle needs code to load",
             "weights_only=True")
    assert not marker.exists()


def test_wrong_shapes_nan_missing_and_extra_tensors_all_reported(tmp_path, cnn_state):
    state = dict(cnn_state)
    state["fc1.weight"] = torch.zeros(64, 1568)
    state["conv1.bias"] = torch.full_like(state["conv1.bias"], float("nan"))
    state["conv2.weight"] = state["conv2.weight"].half()
    del state["fc2.bias"]
    state["head.weight"] = torch.zeros(3)
    folder = make_submission(tmp_path / "bad", state)
    err = _refused(tmp_path, folder,
                   "tensor 'fc1.weight' has shape (64, 1568); expected (128, 1568) for cnn-small",
                   "tensor 'conv1.bias' has 16 NaN and 0 infinite values; expected finite",
                   "tensor 'conv2.weight' has dtype float16; expected float32",
                   "tensor 'fc2.bias' missing; expected shape (10,), float32",
                   "unexpected tensor 'head.weight'")
    assert len(err.problems) == 5


@pytest.mark.parametrize("name, message", [
    ("model.pkl", "'model.pkl' is in a refused format; expected one file ending in "
                  ".safetensors, .pt2, .pt, .pth"),
    ("notes.txt", "weights: none found; expected one file ending in .safetensors"),
])
def test_unsupported_weights_refused(tmp_path, name, message):
    folder = tmp_path / "fmt"
    folder.mkdir()
    (folder / name).write_bytes(b"\x80\x04K\x01.")
    write_metadata(folder)
    _refused(tmp_path, folder, message)


def test_torch_export_with_fixed_batch_refused_with_hint(tmp_path):
    from tests.conftest import TinyCNN

    program = torch.export.export(TinyCNN().eval(), (torch.rand(2, 1, 28, 28),))
    folder = tmp_path / "static"
    folder.mkdir()
    torch.export.save(program, folder / "model.pt2")
    write_metadata(folder, architecture="TinyCNN")
    _refused(tmp_path, folder, "test forward pass", "dynamic_shapes")


def test_unknown_architecture_refused(tmp_path, cnn_state):
    folder = make_submission(tmp_path / "arch", cnn_state, architecture="resnet-9000")
    _refused(tmp_path, folder, "architecture: unknown architecture 'resnet-9000'; expected one "
             "of cnn-small", "timm:<name>")


# --- refused: metadata ---------------------------------------------------------------------

def test_missing_submission_toml(tmp_path, good):
    (good / "submission.toml").unlink()
    _refused(tmp_path, good, "submission.toml: missing; expected a TOML file")


def test_malformed_submission_toml(tmp_path, good):
    (good / "submission.toml").write_text('name = "unterminated\n')
    _refused(tmp_path, good, "submission.toml: not valid TOML")


def test_every_metadata_problem_reported_at_once(tmp_path, good):
    write_metadata(good, license=None, dataset="imagenet", additional_data="no",
                   link="not a url")
    with open(good / "submission.toml", "a") as f:
        f.write('lisence = "MIT"\n')
    err = _refused(tmp_path, good,
                   "submission.toml: license: missing; expected the weights' licence",
                   "submission.toml: dataset: got 'imagenet'; expected fashion-mnist, mnist",
                   "submission.toml: additional_data: got 'no'; expected true or false",
                   "submission.toml: link: got 'not a url'; expected the paper's URL",
                   "unknown key 'lisence'")
    assert len(err.problems) == 5


def test_eps_that_cannot_be_read_refused(tmp_path, good):
    write_metadata(good, eps="eight over 255")
    _refused(tmp_path, good, "submission.toml: eps:")


# --- refused: archives ---------------------------------------------------------------------

def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def test_tar_with_escaping_paths_and_links_refused(tmp_path, good):
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = _tar(tmp_path / "evil.tar.gz",
                   _files(good) | {"../escape.txt": b"x", "/tmp/absolute.txt": b"x"},
                   [_link("passwd", "/etc/passwd"), _link("up", "../../outside"),
                    _link("hard", "../x", hard=True), fifo])
    err = _refused(tmp_path, archive,
                   "'../escape.txt': '..' would escape the submission folder",
                   "'/tmp/absolute.txt': an absolute path",
                   "'passwd': a link to the absolute path '/etc/passwd', outside the submission",
                   "'up': a link to '../../outside', outside the submission",
                   "'hard': a link to '../x', outside the submission",
                   "'pipe': a device file, FIFO or other special file")
    assert len(err.problems) == 6
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/absolute.txt").exists()


def test_zip_with_escaping_path_and_link_refused(tmp_path, good):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in _files(good).items():
            z.writestr(name, data)
        z.writestr("sub/../../escape.txt", b"x")
        link = zipfile.ZipInfo("link")
        link.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores it
        z.writestr(link, "../../../etc/passwd")
    _refused(tmp_path, archive, "'sub/../../escape.txt': '..' would escape",
             "'link': a link to '../../../etc/passwd', outside the submission")


def test_folder_with_link_out_refused(tmp_path, good):
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", good / "notes.txt")
    _refused(tmp_path, good, "'notes.txt': a link to", "outside the submission")


def test_archive_over_size_limit_refused(tmp_path, good):
    with tarfile.open(tmp_path / "big.tar.gz", "w:gz") as tar:
        tar.add(good, arcname=".")
    _refused(tmp_path, tmp_path / "big.tar.gz", "bytes unpacked (at least); the limit is "
             "100000 bytes (max_bytes)", max_bytes=100_000)


def test_archive_over_file_count_refused(tmp_path, good):
    files = _files(good) | {f"extra/{i}.txt": b"x" for i in range(5)}
    _refused(tmp_path, _tar(tmp_path / "many.tar.gz", files), "the limit is 4 (max_files)",
             max_files=4)


def test_not_an_archive_refused(tmp_path):
    path = tmp_path / "model.rar"
    path.write_bytes(b"Rar!")
    _refused(tmp_path, path, "not a folder or a .zip, .tar, .tar.gz or .tgz archive")
