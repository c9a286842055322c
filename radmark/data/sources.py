"""Where shards come from: local files, directories, brace patterns and ``pipe:`` commands.

A user's shard list is expanded once (:func:`expand_shards`); each shard is then streamed sample by
sample (:func:`iter_samples`), from a read-only file or from a command's standard output as
WebDataset's ``pipe:`` URLs do."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO

from braceexpand import braceexpand

from radmark.data.samples import SHARD_SUFFIXES, Sample, one_line
from radmark.data.tarstream import iter_tar
from radmark.errors import InputError, ShardError


def _is_shard_file(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def _expand_local(spec: str, original: str) -> list[str]:
    """A local file, or a directory's shards; a missing path is the user's mistake, named."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        found = sorted(
            entry.name
            for entry in os.scandir(path)
            if _is_shard_file(entry.name) and entry.is_file()
        )
        if not found:
            kinds = ", ".join("*" + s for s in SHARD_SUFFIXES)
            raise InputError(
                f"directory {spec} contains no shards ({kinds}); "
                "point at the shard files or a directory holding them"
            )
        return [os.path.join(path, name) for name in found]
    if os.path.isfile(path):
        return [path]
    if "://" in spec:
        raise InputError(
            f"{spec}: only local shards and pipe: URLs are supported; try 'pipe:curl -fsSL {spec}'"
        )
    if spec != original:
        raise InputError(f"shard {spec} (from pattern {original}) does not exist")
    raise InputError(f"shard {spec} does not exist")


def expand_shards(specs: Sequence[str]) -> list[str]:
    """Turn user shard specs into a flat list of shard URLs.

    Accepts local shard files, directories (their shards by :data:`SHARD_SUFFIXES`: ``.tar``,
    compressed or not, i.e. ``.tar.gz``/``.tgz``, ``.tar.xz``/``.txz``,
    ``.tar.bz2``/``.tbz2``/``.tbz``; sorted by name, not recursive), brace patterns such as
    ``data-{000000..000009}.tar`` and ``pipe:CMD`` URLs. Brace patterns are expanded inside
    ``pipe:`` URLs too (as WebDataset does), so ``pipe:curl -s https://host/data-{0..9}.tar``
    gives ten commands; the commands themselves are not checked here. Duplicates are dropped
    (first occurrence wins) so a shard is never marked or counted twice.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if not spec:
            raise InputError("empty shard path")
        expanded = list(braceexpand(spec)) if "{" in spec else [spec]
        for item in expanded:
            if item.startswith("pipe:"):
                urls = [item]
                identities = [item]
            else:
                urls = _expand_local(item, spec)
                identities = [os.path.realpath(u) for u in urls]
            for url, ident in zip(urls, identities, strict=True):
                if ident not in seen:
                    seen.add(ident)
                    out.append(url)
    if not out:
        raise InputError("no shards given")
    return out


def shard_name(url: str) -> str:
    """The file name an output shard gets for this input shard.

    Output shards keep their input's name so that the marked dataset lines up one to one with the
    original. For a ``pipe:`` URL the name is taken from the command's last word that names a
    shard (``pipe:curl -s https://host/data-000001.tar`` and ``pipe:aws s3 cp s3://b/data-1.tar -``
    both give the tar's name).
    """
    if url.startswith("pipe:"):
        tokens = url[len("pipe:") :].split()
        names = [t.rstrip("/").rsplit("/", 1)[-1] for t in tokens]
        names = [n for n in names if _is_shard_file(n) and n not in SHARD_SUFFIXES]
        if not names:
            raise InputError(
                f"cannot tell the shard name from {url!r}: one of its words should be the "
                f"shard's path or URL ending in {', '.join(SHARD_SUFFIXES)}"
            )
        return names[-1]
    name = os.path.basename(url.rstrip("/"))
    if not name:
        raise InputError(f"cannot tell the shard name from {url!r}")
    return name


def pipe_input_paths(url: str) -> list[str]:
    """Local files a ``pipe:`` command reads, as far as its words show: every argument after
    the program that names an existing file (``pipe:cat in/data.tar`` → ``in/data.tar``;
    ``<FILE`` and ``file://FILE`` are understood too).

    Used to refuse an ``--out`` that would write over an input whatever the URL form; a command
    that hides its input (a script, a variable) cannot be seen through, and is not needed to be:
    output shards are only ever written into ``--out``.
    """
    try:
        words = shlex.split(url[len("pipe:") :])
    except ValueError:
        return []
    found = []
    for word in words[1:]:
        for prefix in ("<", "file://"):
            word = word.removeprefix(prefix)
        path = os.path.expanduser(word)
        if word and os.path.isfile(path):
            found.append(path)
    return found


def input_files(urls: Sequence[str]) -> list[str]:
    """The local files that shard ``urls`` read: the path itself, or what a ``pipe:`` names.

    For the "never write over an input" check of commands that write one file
    (:func:`radmark.fsutil.check_new_target`).
    """
    out: list[str] = []
    for url in urls:
        out.extend(pipe_input_paths(url) if url.startswith("pipe:") else [url])
    return out


#: Environment variables a ``pipe:`` command never sees: it is the user's command, but the
#: passphrase is for radmark only (issue #12).
SCRUBBED_ENV: tuple[str, ...] = ("RADMARK_PASSPHRASE",)


def pipe_env() -> dict[str, str]:
    """The environment of a ``pipe:`` command: ours without :data:`SCRUBBED_ENV`."""
    return {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}


def _stderr_tail(f: IO[bytes]) -> str:
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 2048))
        lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return one_line(lines[-1]) if lines else ""


def _drain(raw: IO[bytes]) -> None:
    while raw.read(1 << 16):
        pass


def _iter_pipe(url: str) -> Iterator[Sample]:
    """Stream a tar from a shell command, as WebDataset's ``pipe:`` URLs do.

    A failing command usually produces an empty or truncated stream; its exit status and last
    stderr line are the useful diagnosis, so they take precedence over the tar error.
    """
    cmd = url[len("pipe:") :]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=pipe_env(),
        )
        assert proc.stdout is not None
        finished = False
        try:
            try:
                yield from iter_tar(url, proc.stdout)
                _drain(proc.stdout)  # let the command finish writing (tar record padding)
                finished = True
            except ShardError as exc:
                proc.stdout.close()
                try:
                    rc = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                if rc not in (0, -signal.SIGPIPE, 128 + signal.SIGPIPE):
                    raise _command_failed(url, rc, err) from None
                raise exc from None
            except OSError as exc:
                raise ShardError(url, f"reading the command's output failed ({exc})") from None
        finally:
            if not finished and proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            raise _command_failed(url, rc, err)


def _command_failed(url: str, rc: int, err: IO[bytes]) -> ShardError:
    tail = _stderr_tail(err)
    return ShardError(url, f"command exited with status {rc}" + (f": {tail}" if tail else ""))


def iter_samples(url: str) -> Iterator[Sample]:
    """Stream the samples of one shard (a local tar, .tar.gz, .tgz or a ``pipe:`` URL).

    Consecutive members with the same key form one sample (the WebDataset convention). Everything
    malformed or unsafe raises :class:`ShardError`; see the module docstring for why we are strict.
    Nothing is extracted to disk and local files are opened read-only.
    """
    if url.startswith("pipe:"):
        yield from _iter_pipe(url)
        return
    try:
        f = open(url, "rb")  # noqa: SIM115 - closed in the finally below, across yields
    except OSError as exc:
        raise ShardError(url, f"cannot open ({exc.strerror or exc})") from None
    try:
        yield from iter_tar(url, f)
    finally:
        f.close()
