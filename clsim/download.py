"""Fetching a dataset's official files into the data root: checksum verified, extracted safely.

`ensure(dataset, root, ...)` does nothing when the dataset's folder is already there (the readers
then name any file it lacks). Otherwise,
holding a lock on the root (two runs downloading into one root wait for each other rather than
write over each other), it downloads each official file (or the same file from --data-mirror)
into a private temporary folder beside the target, checks its MD5 against the official one,
extracts it there, checks every extracted file it knows the checksum of, and only then renames
the folder into place. A cut download, a wrong checksum, a full disk or a hostile archive (a
member outside the folder, a link, a device) gives one UserError and leaves nothing behind:
the temporary folder goes, and a crashed run's leftovers are removed by the next one that takes
the lock. Archives are extracted by this module, not by tarfile/zipfile's extractall
(torchvision's extract_archive calls it without a filter): every member is checked first.

The MD5 is what the publishers (and torchvision) give; it proves the file is the official one
against accidents and mirrors, not against a deliberate collision, which is why extraction and
loading stay defensive whatever the checksum says.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from clsim.errors import UserError

#: set to 1 on machines without internet: a missing dataset is then an error, never a download
OFFLINE_ENV = "CLSIM_NO_DOWNLOAD"
LOCK_NAME = ".clsim-download.lock"
TMP_PREFIX = ".clsim-download-"
CHUNK = 1 << 20


def default_data_root() -> str:
    """The per-user cache folder datasets go to when --data-root is not given."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "clsim", "data")


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Remote:
    """One official file: its name, MD5, and where the publisher serves it (tried in order)."""
    filename: str
    md5: str
    urls: tuple[str, ...]
    #: an archive, extracted into the root; False: a file saved as it is in the dataset's folder
    extract: bool = True


@dataclass
class Dataset:
    """What `ensure` needs to know about one dataset."""
    name: str                     # as users know it, e.g. CIFAR-100
    folder: str                   # the folder under the root its files live in, e.g. cifar-100-python
    #: () -> (the official files, {file inside `folder`: its official MD5, checked after extraction});
    #: called only to download (the tables come from torchvision, slow to import)
    official: Callable[[], tuple[tuple[Remote, ...], dict]]

    def present(self, root: Path) -> bool:
        """The folder only ever appears whole (renamed into place); one a user made is theirs, and
        the readers name any file it lacks."""
        return (root / self.folder).is_dir()


def ensure(dataset: Dataset, root: str | Path, *, download: bool | None = None, mirror: str = "",
           hint: str = "") -> Path:
    """The dataset's folder under `root`, downloaded first if it is not there. `download` None:
    yes unless CLSIM_NO_DOWNLOAD is set. `hint` says where to put the files by hand."""
    root = Path(root).expanduser()
    if dataset.present(root):
        return root / dataset.folder
    if download is False or (download is None and offline()):
        why = "--no-download (--download false)" if download is False else f"{OFFLINE_ENV} is set"
        raise UserError(f"{dataset.name} is not under {root} and downloads are off ({why}): {hint}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data root {root} ({exc.strerror}): pass --data-root a writable folder") from None
    with _locked(root):
        if dataset.present(root):   # another run fetched it while this one waited
            return root / dataset.folder
        _remove_leftovers(root)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
        try:
            _fetch_into(dataset, root, tmp, mirror)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"disk full while fetching {dataset.name} into {root}; nothing was kept: "
                                f"free space there or pass --data-root another disk") from None
            raise UserError(f"could not write {dataset.name} into {root} ({exc.strerror or exc}); "
                            f"nothing was kept: {hint}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / dataset.folder


def _fetch_into(dataset: Dataset, root: Path, tmp: Path, mirror: str) -> None:
    remotes, contents = dataset.official()
    staged = tmp / "out"
    (staged / dataset.folder).mkdir(parents=True)
    for remote in remotes:
        path = _download(dataset, remote, tmp, mirror)
        if remote.extract:
            _extract(path, staged, dataset.name)
            path.unlink()
        else:
            os.replace(path, staged / dataset.folder / remote.filename)
    for name, md5 in contents.items():
        got = staged / dataset.folder / name
        if not got.is_file() or _md5_of(got) != md5:
            raise UserError(f"the {dataset.name} archive does not hold the official {dataset.folder}/{name} "
                            f"({'missing' if not got.is_file() else 'checksum differs'}); nothing was kept")
    target = root / dataset.folder
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged / dataset.folder, target)   # atomic: the folder appears whole or not at all


def _download(dataset: Dataset, remote: Remote, tmp: Path, mirror: str) -> Path:
    urls = (f"{mirror.rstrip('/')}/{remote.filename}",) if mirror else remote.urls
    failures = []
    for url in urls:
        path = tmp / (remote.filename + ".part")
        try:
            md5 = _stream(url, path, f"{dataset.name}: {remote.filename}")
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, _Cut) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
            continue
        if md5 != remote.md5:
            failures.append(f"{url}: checksum {md5}, the official one is {remote.md5}")
            continue
        done = tmp / remote.filename
        os.replace(path, done)
        return done
    where = "the mirror" if mirror else "every official location"
    raise UserError(f"could not download {dataset.name} ({remote.filename}) from {where}, nothing was kept: "
                    f"{'; '.join(failures)}. Check the connection, pass --data-mirror URL (a folder holding "
                    f"{remote.filename}), or put the files in the data root yourself")


class _Cut(Exception):
    """The server closed the connection before sending the whole file."""


def _stream(url: str, path: Path, label: str) -> str:
    """Save `url` to `path` with a progress bar on stderr; the MD5 of what was received."""
    from tqdm import tqdm
    print(f"downloading {label} from {url}", file=sys.stderr)
    request = urllib.request.Request(url, headers={"User-Agent": "clsim"})
    digest, received = hashlib.md5(), 0
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
        size = response.headers.get("Content-Length")
        size = int(size) if size and size.isdigit() else None
        with tqdm(total=size, unit="B", unit_scale=True, desc=label, file=sys.stderr, disable=None,
                  leave=False) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if size is not None and received != size:
        raise _Cut(f"connection closed after {received} of {size} bytes")
    return digest.hexdigest()


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(name: str, archive: str) -> PurePosixPath:
    """A member name that stays inside the extraction folder, or a UserError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or ":" in path.parts[0]:
        raise UserError(f"refused archive {archive}: member {name!r} would be written outside the data "
                        f"folder (a hostile or broken archive); nothing was extracted")
    return path


def _extract(archive: Path, dest: Path, name: str) -> None:
    """Extract every member after checking them all: plain files and folders only, all inside `dest`,
    and room for them on the disk."""
    shown = f"{name} ({archive.name})"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                members = z.infolist()
                for m in members:
                    _safe_name(m.filename, shown)
                    kind = stat.S_IFMT(m.external_attr >> 16)
                    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                        raise UserError(f"refused archive {shown}: member {m.filename!r} is a link or device, "
                                        f"which the official archive never holds; nothing was extracted")
                _check_room(dest, sum(m.file_size for m in members), shown)
                for m in members:
                    _write_member(dest, m.filename, m.is_dir(), lambda m=m: z.open(m))
            return
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _safe_name(m.name, shown)
                if not (m.isfile() or m.isdir()):
                    raise UserError(f"refused archive {shown}: member {m.name!r} is a link or device, "
                                    f"which the official archive never holds; nothing was extracted")
            _check_room(dest, sum(m.size for m in members), shown)
            for m in members:
                _write_member(dest, m.name, m.isdir(), lambda m=m: t.extractfile(m))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise UserError(f"corrupt archive {shown} ({exc}); nothing was extracted") from None


def _check_room(dest: Path, needed: int, shown: str) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{shown} needs {needed} bytes, {free} free")


def _write_member(dest: Path, name: str, is_dir: bool, open_member) -> None:
    path = dest.joinpath(*_safe_name(name, str(dest)).parts)
    if is_dir:
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_member() as src, open(path, "xb") as out:   # "x": never through an existing file or link
        shutil.copyfileobj(src, out, CHUNK)


@contextmanager
def _locked(root: Path):
    with open(root / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run downloading into {root}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    """Temporary folders of runs that died mid-download (only the lock holder writes any)."""
    for path in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)
