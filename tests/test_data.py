"""batchnorm.data: the IDX and CIFAR-10 readers, where files are found, verification, downloads,
clear errors.

Error paths use small IDX files written byte by byte here (struct, not the library's code); the real
MNIST and Fashion-MNIST files (shared/data) check the loader on the data it exists for. CIFAR-10 is
not available here: its reader is tested on small batch files written the way Python 2's cPickle
wrote the real ones, and on an archive laid out like cifar-10-python.tar.gz.
"""

import contextlib
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import data
from batchnorm.data.cifar import CifarError, parse_batch, parse_meta
from batchnorm.data.idx import IdxError, parse_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """A ubyte IDX file: 0x00 0x00 0x08 ndim, big-endian uint32 dims, then the bytes."""
    array = np.asarray(array, dtype=np.uint8)
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def make_tiny(folder: Path, *, n_train=20, n_test=10, side=6, compress=True, seed=0):
    """Write a tiny IDX data set into ``folder``; return (spec, arrays)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "test_labels": rng.integers(0, 3, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, f in data.MNIST.files.items():
        raw = idx_bytes(arrays[role])
        if compress:
            (folder / f.name).write_bytes(gzip.compress(raw))
        else:
            (folder / f.name[:-3]).write_bytes(raw)
        files[role] = data.FileSpec(f.name, hashlib.md5(raw).hexdigest())
    spec = data.DatasetSpec(name="tiny", files=files, classes=("a", "b", "c"))
    return spec, arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $BATCHNORM_DATA, and a private cache root."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


def assert_same(ds: data.Dataset, arrays: dict) -> None:
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.images.shape == (len(arrays["train_images"]), 1, 6, 6)
    np.testing.assert_array_equal(ds.train.images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(ds.train.labels.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(ds.test.images[:, 0].numpy(), arrays["test_images"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), arrays["test_labels"])


# -- the IDX format -------------------------------------------------------------------------------


def test_parse_idx_reads_what_was_written():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(a)), a)
    assert parse_idx(idx_bytes(a)).flags.writeable


def test_parse_idx_multibyte_types_are_big_endian():
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 1, -70000)
    np.testing.assert_array_equal(parse_idx(raw), [1, -70000])


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    cut=st.floats(0, 1, exclude_max=True),
    seed=st.integers(0, 2**16),
)
def test_any_idx_round_trips_and_any_truncation_is_refused(shape, cut, seed):
    a = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    raw = idx_bytes(a)
    np.testing.assert_array_equal(parse_idx(raw), a)
    with pytest.raises(IdxError, match="truncated"):
        parse_idx(raw[: int(cut * len(raw))])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "not even an IDX header"),
        (b"PK\x03\x04rest", "not an IDX file"),
        (bytes([0, 0, 8, 3]) + struct.pack(">II", 5, 28), "truncated inside its header"),
        (
            idx_bytes(np.zeros((5, 4), np.uint8))[:-3],
            r"is truncated: 29 bytes, but its header \(dims \(5, 4\)\) needs 32",
        ),
        (idx_bytes(np.zeros((5, 4), np.uint8)) + b"\x00", "longer than its header says"),
    ],
    ids=["short", "magic", "header", "payload", "trailing"],
)
def test_parse_idx_refuses_malformed_files(raw, message):
    with pytest.raises(IdxError, match=message):
        parse_idx(raw, "some.idx")


# -- finding and loading --------------------------------------------------------------------------


def test_load_from_data_dir(isolated):
    spec, arrays = make_tiny(isolated / "d")
    ds = data.load(spec, isolated / "d")
    assert_same(ds, arrays)
    assert ds.source == isolated / "d" and ds.classes == ("a", "b", "c")


def test_data_dir_may_hold_a_subfolder_named_after_the_data_set(isolated):
    spec, arrays = make_tiny(isolated / "root" / "tiny")
    assert_same(data.load(spec, isolated / "root"), arrays)


def test_uncompressed_idx_files_are_accepted(isolated):
    spec, arrays = make_tiny(isolated / "d", compress=False)
    assert_same(data.load(spec, isolated / "d"), arrays)


def test_recompressed_copies_are_accepted(isolated):
    """Debian recompressed Fashion-MNIST: different .gz bytes, same content, same data set."""
    spec, arrays = make_tiny(isolated / "d")
    for f in spec.files.values():
        path = isolated / "d" / f.name
        path.write_bytes(
            gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=7)
        )
    assert_same(data.load(spec, isolated / "d"), arrays)


def test_env_var_then_cache(isolated, monkeypatch):
    spec, arrays = make_tiny(isolated / "envroot" / "tiny")
    monkeypatch.setenv(data.ENV_VAR, str(isolated / "envroot"))
    assert data.load(spec, download=False).source == isolated / "envroot" / "tiny"
    monkeypatch.delenv(data.ENV_VAR)
    make_tiny(data.cache_dir(spec), seed=0)
    assert data.cache_dir(spec) == isolated / "cache" / "data" / "tiny"
    ds = data.load(spec, download=False)
    assert ds.source == data.cache_dir(spec)
    assert_same(ds, arrays)


def test_explicit_data_dir_is_the_only_place_searched(isolated):
    spec, _ = make_tiny(isolated / "cache" / "data" / "tiny")  # a complete cache...
    assert data.load(spec).source == data.cache_dir(spec)
    (isolated / "empty").mkdir()
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load(spec, isolated / "empty")  # ...is not used when data_dir is given
    msg = str(err.value)
    assert str(isolated / "empty") in msg and str(isolated / "empty" / "tiny") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "no such folder" in msg


def test_missing_file_is_named(isolated):
    spec, _ = make_tiny(isolated / "d")
    (isolated / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte\.gz"):
        data.load(spec, isolated / "d")


def test_offline_error_lists_every_place_and_the_fix(isolated):
    spec, _ = make_tiny(isolated / "elsewhere")
    spec = replace(spec, mirrors=(f"http://127.0.0.1:{closed_port()}/",))
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load(spec)
    msg = str(err.value)
    for expected in (
        "$BATCHNORM_DATA: not set",
        str(isolated / "cache" / "data" / "tiny"),
        "download into",
        "train-images-idx3-ubyte.gz: ",  # the failed URL
        "--data-dir",
        "BATCHNORM_DATA",
    ):
        assert expected in msg, (expected, msg)
    assert not any(p.is_file() for p in (isolated / "cache").rglob("*")), "nothing may be left"


def test_no_download_says_so(isolated):
    spec, _ = make_tiny(isolated / "elsewhere")
    with pytest.raises(data.DatasetNotFoundError, match="not attempted"):
        data.load(spec, download=False)


# -- damaged files --------------------------------------------------------------------------------


def test_truncated_gzip_names_the_file_and_the_fix(isolated):
    spec, _ = make_tiny(isolated / "d")
    path = isolated / "d" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(data.CorruptFileError) as err:
        data.load(spec, isolated / "d")
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert "Replace it with a good copy" in str(err.value)


def test_corrupted_gzip_names_the_file(isolated):
    spec, _ = make_tiny(isolated / "d")
    path = isolated / "d" / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(data.CorruptFileError, match=str(path)):
        data.load(spec, isolated / "d")


def test_wrong_content_fails_the_checksum(isolated):
    spec, _ = make_tiny(isolated / "d")
    make_tiny(isolated / "other", seed=1)  # well-formed IDX files of other values
    src = isolated / "other" / "t10k-images-idx3-ubyte.gz"
    (isolated / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(src.read_bytes())
    with pytest.raises(data.ChecksumError, match=r"t10k-images-idx3-ubyte\.gz is not the expected"):
        data.load(spec, isolated / "d")


def test_corrupt_file_in_cache_says_delete_it(isolated):
    spec, _ = make_tiny(isolated / "x")
    make_tiny(data.cache_dir(spec))
    path = data.cache_dir(spec) / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(data.CorruptFileError, match="Delete it; the next run downloads it again"):
        data.load(spec, download=False)


def test_image_label_count_mismatch(isolated):
    spec, arrays = make_tiny(isolated / "d")
    raw = idx_bytes(arrays["test_labels"][:-1])
    (isolated / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    files = dict(
        spec.files,
        test_labels=data.FileSpec("t10k-labels-idx1-ubyte.gz", hashlib.md5(raw).hexdigest()),
    )
    with pytest.raises(data.CorruptFileError, match=r"holds 10 images but .* holds 9 labels"):
        data.load(replace(spec, files=files), isolated / "d")


def test_label_out_of_range(isolated):
    spec, _ = make_tiny(isolated / "d")
    with pytest.raises(data.CorruptFileError, match="out of range for 2 classes"):
        data.load(replace(spec, classes=("a", "b")), isolated / "d")


# -- downloads, from a server on 127.0.0.1 ----------------------------------------------------------


@contextlib.contextmanager
def serve(folder: Path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_verifies_and_fills_the_cache(isolated):
    spec, arrays = make_tiny(isolated / "mirror")
    with serve(isolated / "mirror") as url:
        spec = replace(spec, mirrors=(f"http://127.0.0.1:{closed_port()}/", url))  # first one down
        ds = data.load(spec)
    assert ds.source == data.cache_dir(spec)
    assert_same(ds, arrays)
    assert sorted(p.name for p in data.cache_dir(spec).iterdir()) == sorted(
        f.name for f in spec.files.values()
    )


def test_bad_download_leaves_nothing_behind(isolated):
    spec, _ = make_tiny(isolated / "good")
    make_tiny(isolated / "mirror", seed=3)  # the mirror serves different content
    with serve(isolated / "mirror") as url, pytest.raises(data.DatasetNotFoundError) as err:
        data.load(replace(spec, mirrors=(url,)))
    assert "expected" in str(err.value) and "discarded" in str(err.value)
    left = list(data.cache_dir(spec).iterdir()) if data.cache_dir(spec).exists() else []
    assert left == [], f"a failed download left {left}"


# -- the real data sets ---------------------------------------------------------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(data_root, isolated):
    ds = data.load("mnist", data_root / "mnist", download=False)
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (
        10000,
        1,
        28,
        28,
    )
    assert ds.train.labels.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert ds.test.labels.bincount().tolist() == MNIST_TEST_COUNTS
    assert ds.train.images.float().div(255).mean().item() == pytest.approx(0.1307, abs=1e-4)


def test_real_fashion_mnist_via_env_root(data_root, isolated, monkeypatch, tmp_path):
    (tmp_path / "fashion-mnist").symlink_to(data_root / "fashion-mnist")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))  # a root with mnist/ and fashion-mnist/
    ds = data.load("fashion-mnist", download=False)
    assert ds.source == tmp_path / "fashion-mnist"
    assert ds.train.labels.bincount().tolist() == [6000] * 10
    assert ds.test.labels.bincount().tolist() == [1000] * 10
    assert ds.train.images.float().div(255).mean().item() == pytest.approx(0.286, abs=1e-3)
    assert ds.classes[9] == "Ankle boot"


def test_unknown_data_set_name():
    with pytest.raises(
        ValueError, match="unknown data set 'cifar11'; choose one of mnist, fashion-mnist"
    ):
        data.load("cifar11")


# -- CIFAR-10 (python pickles), on small generated files ------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote at protocol 2 for the CIFAR-10 batches: byte strings
    as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), numpy's globals under their numpy 1 names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


CIFAR_CLASSES = [c.encode() for c in data.CIFAR10.classes]


def cifar_batch(n: int, seed: int, *, label_max: int = 10) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A batch file's bytes, and the images (N, 3, 32, 32) and labels it must read back as."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, label_max, n)
    rows = np.stack([np.concatenate([p[0].ravel(), p[1].ravel(), p[2].ravel()]) for p in planes])
    content = py2_pickle(
        {
            b"batch_label": b"training batch 1 of 5",
            b"labels": [int(v) for v in labels],
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
    )
    return content, planes, labels


def make_tiny_cifar(folder: Path, *, n=4, seed=0):
    """A CIFAR-10-shaped data set of 5×n training and n test images in ``folder``; (spec, arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, train_x, train_y = {}, [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        content, x, y = cifar_batch(n, seed * 10 + i)
        (folder / name).write_bytes(content)
        files[name] = data.FileSpec(name, hashlib.md5(content).hexdigest())
        if name == "test_batch":
            test = (x, y)
        else:
            train_x.append(x)
            train_y.append(y)
    meta = py2_pickle({b"label_names": CIFAR_CLASSES, b"num_cases_per_batch": n, b"num_vis": 3072})
    (folder / "batches.meta").write_bytes(meta)
    files["batches.meta"] = data.FileSpec("batches.meta", hashlib.md5(meta).hexdigest())
    spec = replace(data.CIFAR10, name="tiny-cifar", files=files, mirrors=())
    return spec, {"train": (np.concatenate(train_x), np.concatenate(train_y)), "test": test}


def assert_same_cifar(ds: data.Dataset, arrays: dict) -> None:
    for split, (x, y) in (("train", arrays["train"]), ("test", arrays["test"])):
        got = getattr(ds, split)
        assert got.images.dtype == torch.uint8 and got.images.shape == (len(x), 3, 32, 32)
        np.testing.assert_array_equal(got.images.numpy(), x)
        np.testing.assert_array_equal(got.labels.numpy(), y)
    assert ds.classes == data.CIFAR10.classes


def test_cifar_batch_reads_rows_as_red_green_blue_planes():
    content, planes, labels = cifar_batch(3, seed=1)
    x, y = parse_batch(content)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, planes)  # channel 0 = the first 1,024 values of a row, ...
    np.testing.assert_array_equal(y, labels)
    assert parse_meta(py2_pickle({b"label_names": CIFAR_CLASSES})) == data.CIFAR10.classes


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_batch_written_by_python3_is_read_too(protocol):
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    x, y = parse_batch(pickle.dumps({"data": rows, "labels": [3, 7]}, protocol=protocol))
    np.testing.assert_array_equal(x.reshape(2, -1), rows)
    assert y.tolist() == [3, 7]


def test_cifar_pickle_that_calls_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    content = pickle.dumps({"data": Evil(), "labels": []}, protocol=2)
    with pytest.raises(CifarError, match=r"evil_batch .* refers to (posix|nt)\.mkdir.*refused"):
        parse_batch(content, "evil_batch")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "holds a list, not a CIFAR-10 dict"),
        ({"labels": [1]}, "has no 'data' entry"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "must be a uint8 array"),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, "must hold 3072 values"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
        ({"data": np.zeros((1, 3072), np.uint8), "labels": ["cat"]}, "not a list of integers"),
    ],
)
def test_cifar_batch_that_is_not_one_says_why(obj, message):
    with pytest.raises(CifarError, match=message):
        parse_batch(pickle.dumps(obj, protocol=2), "batch")


def test_cifar_truncated_pickle_names_the_file():
    content, _, _ = cifar_batch(2, seed=0)
    with pytest.raises(CifarError, match="data_batch_3 is not a readable pickle"):
        parse_batch(content[:-100], "data_batch_3")


def test_cifar_load_from_data_dir_and_its_archive_folder(isolated):
    spec, arrays = make_tiny_cifar(isolated / "root" / "cifar-10-batches-py")
    ds = data.load(spec, isolated / "root")  # found in the folder the archive unpacks to
    assert ds.source == isolated / "root" / "cifar-10-batches-py"
    assert_same_cifar(ds, arrays)
    assert len(ds.train) == 20 and len(ds.test) == 4


def rewrite(folder: Path, spec, name: str, content: bytes):
    """Replace one file and give the spec its md5: content that passes the checksum."""
    (folder / name).write_bytes(content)
    return replace(
        spec,
        files=dict(spec.files, **{name: data.FileSpec(name, hashlib.md5(content).hexdigest())}),
    )


def test_cifar_wrong_class_names_are_refused(isolated):
    spec, _ = make_tiny_cifar(isolated / "d")
    meta = py2_pickle({b"label_names": [*CIFAR_CLASSES[:9], b"lorry"]})
    spec = rewrite(isolated / "d", spec, "batches.meta", meta)
    with pytest.raises(data.CorruptFileError, match=r"batches\.meta names the classes"):
        data.load(spec, isolated / "d")


def test_cifar_label_out_of_range_is_refused(isolated):
    spec, _ = make_tiny_cifar(isolated / "d")
    rows = np.zeros((2, 3072), np.uint8)
    spec = rewrite(
        isolated / "d", spec, "test_batch", py2_pickle({b"data": rows, b"labels": [3, 10]})
    )
    with pytest.raises(data.CorruptFileError, match="test_batch: a label is out of range for 10"):
        data.load(spec, isolated / "d")


def test_cifar_changed_file_fails_its_checksum(isolated):
    spec, _ = make_tiny_cifar(isolated / "d")
    other, _, _ = cifar_batch(4, seed=99)
    (isolated / "d" / "data_batch_2").write_bytes(other)
    with pytest.raises(data.ChecksumError, match="data_batch_2 is not the expected file"):
        data.load(spec, isolated / "d")


def cifar_archive(folder: Path, files_from: Path, name="cifar-10-python.tar.gz") -> str:
    """Pack ``files_from`` as cifar-10-batches-py/... into ``folder/name``; return its md5."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / name, "w:gz") as tar:
        for p in sorted(files_from.iterdir()):
            tar.add(p, arcname=f"cifar-10-batches-py/{p.name}")
    return hashlib.md5((folder / name).read_bytes()).hexdigest()


def test_cifar_download_checks_the_archive_and_extracts_each_file(isolated):
    spec, arrays = make_tiny_cifar(isolated / "files")
    md5 = cifar_archive(isolated / "mirror", isolated / "files")
    with serve(isolated / "mirror") as url:
        spec = replace(
            spec,
            mirrors=(f"http://127.0.0.1:{closed_port()}/", url),  # the first one is down
            archive=replace(spec.archive, md5=md5),
        )
        ds = data.load(spec)
    assert ds.source == data.cache_dir(spec)
    assert_same_cifar(ds, arrays)
    # the files, and nothing else: the archive is deleted once they are out
    assert sorted(p.name for p in data.cache_dir(spec).iterdir()) == sorted(spec.files)


def test_cifar_bad_archive_leaves_nothing_behind(isolated):
    spec, _ = make_tiny_cifar(isolated / "files")
    md5 = cifar_archive(isolated / "mirror", isolated / "files")
    with serve(isolated / "mirror") as url:
        wrong = replace(spec, mirrors=(url,), archive=replace(spec.archive, md5="0" * 32))
        with pytest.raises(data.DatasetNotFoundError, match=r"expected 0{32}; discarded"):
            data.load(wrong)
        # the right archive, but one of its files is not the one the spec names
        files = dict(spec.files, test_batch=data.FileSpec("test_batch", "f" * 32))
        changed = replace(spec, files=files, mirrors=(url,), archive=replace(spec.archive, md5=md5))
        with pytest.raises(data.DatasetNotFoundError, match="test_batch in the archive has md5"):
            data.load(changed)
    left = list(data.cache_dir(spec).iterdir()) if data.cache_dir(spec).exists() else []
    # files extracted before the bad one were verified and may stay; no archive, no partial file
    assert all(p.name in spec.files and not p.name.startswith(".") for p in left), left


def test_real_cifar10_spec_not_found_says_how_to_get_it(isolated):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load("cifar10", download=False)
    msg = str(err.value)
    assert "cifar10: data set not found" in msg and str(data.cache_dir(data.CIFAR10)) in msg
    assert "unpack cifar-10-python.tar.gz: they are in its cifar-10-batches-py/ folder" in msg
    assert data.CIFAR10.archive.md5 == "c58f30108f718f92721af3b95e74349a"
    assert len(data.CIFAR10.files) == 7


def test_the_suite_says_once_why_real_data_tests_skip(tmp_path):
    """Without the data sets anywhere the library looks, the real-data tests skip, and the run
    ends with one line saying how many and why (not 32 silent skips)."""
    env = {k: v for k, v in os.environ.items() if k not in (data.ENV_VAR, "CI")}
    env |= {"BATCHNORM_TEST_DATA": str(tmp_path / "none"), "BATCHNORM_CACHE": str(tmp_path)}
    env["BATCHNORM_KERNELS"] = "off"  # an empty cache: do not build the kernels for this
    tests = "test_real_mnist or test_real_fashion_mnist_via_env_root"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout
    assert "2 skipped" in out.stdout and "need the real data sets skipped" in out.stdout, out.stdout
    assert "BATCHNORM_DATA" in out.stdout
