"""Verified downloads: every file the notebooks fetch, where it lives, and how it is fetched.

Every file is checked against its sha256 before use. Downloads go to a temporary file that is
renamed into place only once complete and verified, so an interrupted download never leaves a
file that looks finished. Set ``LORA_DATA_DIR`` to a pre-filled copy to work offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .settings import data_dir


class DownloadError(RuntimeError):
    """A file could not be downloaded from any of its addresses."""


class CorruptFileError(RuntimeError):
    """A file's sha256 does not match the expected one."""


@dataclass(frozen=True)
class Resource:
    """A file the notebooks need: where it lives in the data folder and how to get it."""

    path: str  # relative to the data folder
    sha256: str
    urls: tuple[str, ...]  # tried in order: main address first, then backups
    zip_member: str | None = None  # set when the URLs serve a zip holding the file


RESOURCES = {
    "tinyshakespeare": Resource(
        path="corpus/tinyshakespeare.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        urls=(
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        ),
    ),
    "the-verdict": Resource(
        path="corpus/the-verdict.txt",
        sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        urls=(
            "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        ),
    ),
    "sms_spam": Resource(
        path="sms_spam/SMSSpamCollection",
        sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        urls=(
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
        ),
        zip_member="SMSSpamCollection",
    ),
}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise CorruptFileError unless ``path`` has the expected sha256."""
    actual = sha256_of(path)
    if actual != expected:
        raise CorruptFileError(
            f"{path} is corrupt or not the expected file: sha256 is {actual}, expected "
            f"{expected}. Delete it and run again to download a fresh copy."
        )


def download_file(
    url: str,
    dest: Path,
    timeout: float = 30.0,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    deadline: float | None = None,
) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename), with a progress bar.

    ``timeout`` bounds connecting and each wait for data (a server that accepts but never
    answers); ``deadline``, if given, the whole download (TimeoutError beyond it). If given,
    the size and sha256 are checked before the rename (CorruptFileError otherwise). On any
    failure the temporary file is removed and ``dest`` is left untouched.
    """
    start = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                # read1: whatever has arrived (up to 64 KiB), so the deadline is checked often
                for chunk in iter(lambda: response.read1(1 << 16), b""):
                    if deadline is not None and time.monotonic() - start > deadline:
                        raise TimeoutError(
                            f"the download took longer than its deadline of {deadline} s"
                        )
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            n_bytes = out.tell()
        if expected_size is not None and n_bytes != expected_size:
            raise CorruptFileError(
                f"Download of {url} is incomplete or not the expected file: its size is "
                f"{n_bytes} bytes, expected {expected_size}. Nothing was saved; run again."
            )
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise CorruptFileError(
                f"Download of {url} is corrupt or not the expected file: sha256 is "
                f"{digest.hexdigest()}, expected {expected_sha256}. Nothing was saved; run again."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def safe_extract(archive: Path, member: str, dest: Path) -> None:
    """Extract one ``member`` of a zip file to ``dest``, refusing names that leave its folder."""
    target_dir = dest.parent.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            resolved = (target_dir / info.filename).resolve()
            if not resolved.is_relative_to(target_dir):
                raise ValueError(
                    f"Refusing to extract {archive}: member {info.filename!r} would be written "
                    f"outside {target_dir}."
                )
        if member not in zf.namelist():
            raise CorruptFileError(f"{archive} has no member {member!r}: {zf.namelist()}")
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)


def _download_verified(
    resource: Resource, url: str, dest: Path, timeout: float, deadline: float
) -> None:
    """Fetch one address into ``dest``; only a file with the right sha256 is kept."""
    if resource.zip_member is None:  # checked while it streams, renamed only if right
        download_file(url, dest, timeout, expected_sha256=resource.sha256, deadline=deadline)
        return
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive, staged = Path(tmp) / "download.zip", Path(tmp) / dest.name
        download_file(url, archive, timeout, deadline=deadline)
        safe_extract(archive, resource.zip_member, staged)
        verify_sha256(staged, resource.sha256)
        os.replace(staged, dest)


def fetch(name: str, timeout: float = 5.0, deadline: float = 60.0) -> Path:
    """Return the verified local path of resource ``name``, downloading it if needed.

    A file already in the data folder is verified and used without any network call. Each
    address gets ``timeout`` seconds to connect and for each wait for data, and ``deadline``
    seconds in all, then the next is tried: a server that never answers costs 5 s, not minutes.
    """
    if name not in RESOURCES:
        raise KeyError(f"Unknown resource {name!r}; known: {sorted(RESOURCES)}")
    resource = RESOURCES[name]
    dest = data_dir() / resource.path
    if dest.exists():
        verify_sha256(dest, resource.sha256)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in resource.urls:
        try:
            _download_verified(resource, url, dest, timeout, deadline)
            return dest
        except (OSError, urllib.error.URLError, CorruptFileError, zipfile.BadZipFile) as err:
            failures.append(f"  {url}: {err}")
    raise DownloadError(
        f"Could not download {name!r} (no network, or the file changed upstream):\n"
        + "\n".join(failures)
        + f"\nDownload it by hand and place it at {dest} (sha256 {resource.sha256}), or set "
        "LORA_DATA_DIR to a folder that already holds it (e.g. an offline copy)."
    )
