"""Key files: keygen's mode and --force, and every load error with its exact message."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dst.crypto.keys import KEY_BYTES, generate_key_file, load_key_file, load_keys_file
from dst.errors import DstError, UsageError

HEX_A = "ab" * 32
HEX_B = "0123456789abcdef" * 4


def write(path: Path, text: str | bytes, mode: int = 0o600) -> str:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return str(path)


def usage_error(fn: object, *args: object) -> str:
    with pytest.raises(UsageError) as ei:
        fn(*args)  # type: ignore[operator]
    assert ei.value.exit_code == 2
    return str(ei.value)


# ---- dst keygen -----------------------------------------------------------


def test_keygen_writes_64_hex_chars_and_newline_mode_0600(tmp_path: Path) -> None:
    p = tmp_path / "k"
    old = os.umask(0)  # a permissive umask must not widen the mode
    try:
        generate_key_file(str(p))
    finally:
        os.umask(old)
    text = p.read_text()
    assert len(text) == 65 and text.endswith("\n")
    assert text[:-1] == text[:-1].lower() and bytes.fromhex(text[:-1])
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert load_key_file(str(p)) == bytes.fromhex(text)
    assert len(load_key_file(str(p))) == KEY_BYTES


def test_keygen_keys_differ(tmp_path: Path) -> None:
    generate_key_file(str(tmp_path / "a"))
    generate_key_file(str(tmp_path / "b"))
    assert load_key_file(str(tmp_path / "a")) != load_key_file(str(tmp_path / "b"))


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    p = write(tmp_path / "k", HEX_A + "\n")
    assert usage_error(generate_key_file, p) == f"key file {p} exists; use --force to overwrite it"
    assert load_key_file(p) == bytes.fromhex(HEX_A)


def test_keygen_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    (tmp_path / "k").symlink_to(target)
    p = str(tmp_path / "k")
    assert usage_error(generate_key_file, p) == f"key file {p} exists; use --force to overwrite it"
    assert not target.exists()


def test_keygen_force_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    p = write(tmp_path / "k", HEX_A + "\n", 0o644)
    generate_key_file(p, force=True)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert load_key_file(p) != bytes.fromhex(HEX_A)
    assert sorted(os.listdir(tmp_path)) == ["k"]  # no temporary file left behind


def test_keygen_force_creates_a_missing_file(tmp_path: Path) -> None:
    p = str(tmp_path / "new")
    generate_key_file(p, force=True)
    assert len(load_key_file(p)) == KEY_BYTES


def runtime_error(fn: object, *args: object) -> str:
    """A problem found by trying: DstError, exit code 1 (not a usage error)."""
    with pytest.raises(DstError) as ei:
        fn(*args)  # type: ignore[operator]
    assert not isinstance(ei.value, UsageError) and ei.value.exit_code == 1
    return str(ei.value)


def test_keygen_into_missing_directory(tmp_path: Path) -> None:
    p = str(tmp_path / "nodir" / "k")
    for force in (False, True):
        assert runtime_error(generate_key_file, p, force) == (
            f"cannot write key file {p}: No such file or directory; choose a path in an "
            "existing directory that you may write to"
        )


def test_keygen_force_onto_a_directory(tmp_path: Path) -> None:
    msg = runtime_error(generate_key_file, str(tmp_path), True)
    assert msg.startswith(f"cannot write key file {tmp_path}: Is a directory;")


# ---- load_key_file --------------------------------------------------------


@pytest.mark.parametrize("text", [HEX_A, HEX_A + "\n", HEX_A.upper() + "\n"])
def test_load_valid_key(tmp_path: Path, text: str) -> None:
    assert load_key_file(write(tmp_path / "k", text)) == bytes.fromhex(HEX_A)


def test_missing_key_file(tmp_path: Path) -> None:
    p = str(tmp_path / "k")
    assert usage_error(load_key_file, p) == (
        f"key file {p} does not exist; create one with `dst keygen {p}`"
    )


@pytest.mark.parametrize(
    ("mode", "word"),
    [
        (0o644, "readable"),
        (0o640, "readable"),
        (0o604, "readable"),
        (0o620, "writable"),
        (0o601, "accessible"),
    ],
)
def test_key_file_open_to_others(tmp_path: Path, mode: int, word: str) -> None:
    p = write(tmp_path / "k", HEX_A + "\n", mode)
    assert usage_error(load_key_file, p) == (
        f"key file {p} is {word} by group or others (mode {mode:04o}); run `chmod 600 {p}`"
    )


def test_key_file_0400_is_fine(tmp_path: Path) -> None:
    assert load_key_file(write(tmp_path / "k", HEX_A, 0o400)) == bytes.fromhex(HEX_A)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "it has 0 characters"),
        ("abcdef123456\n", "it has 12 characters"),
        (HEX_A + "\n\n", "it has 65 characters"),
        (HEX_A + "\r\n", "it has 65 characters"),
        (" " + HEX_A[1:], "it contains ' ', which is not a hex digit"),
        (HEX_A[:-1] + "g\n", "it contains 'g', which is not a hex digit"),
    ],
)
def test_malformed_key_file(tmp_path: Path, content: str, problem: str) -> None:
    p = write(tmp_path / "k", content)
    assert usage_error(load_key_file, p) == (
        f"key file {p} is malformed: it must hold 64 hex characters (a trailing newline is "
        f"allowed) but {problem}; create a new key with `dst keygen --force {p}`"
    )


def test_binary_key_file_is_malformed(tmp_path: Path) -> None:
    p = write(tmp_path / "k", bytes(range(200, 256)) + b"\xff" * 8)
    assert "is malformed: it must hold 64 hex characters" in usage_error(load_key_file, p)


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    assert usage_error(load_key_file, str(d)) == (
        f"key file {d} is not a regular file; give the path of a file"
    )


def test_key_file_that_is_a_fifo(tmp_path: Path) -> None:
    p = tmp_path / "fifo"
    os.mkfifo(p, 0o600)
    assert usage_error(load_key_file, str(p)) == (
        f"key file {p} is not a regular file; give the path of a file"
    )


def test_unreadable_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path / "k", HEX_A)

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    assert usage_error(load_key_file, p) == (
        f"key file {p} cannot be read: permission denied; run dst as the user that owns it, "
        "or `chown` it to the user that runs dst"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_key_file_for_real(tmp_path: Path) -> None:
    p = write(tmp_path / "k", HEX_A, 0o000)
    assert "cannot be read: permission denied" in usage_error(load_key_file, p)


# ---- load_keys_file -------------------------------------------------------


def test_load_keys_file(tmp_path: Path) -> None:
    p = write(tmp_path / "keys", f"# clients\n\nalpha {HEX_A}\n  beta\t{HEX_B}  \n   # end\n")
    assert load_keys_file(p) == {"alpha": bytes.fromhex(HEX_A), "beta": bytes.fromhex(HEX_B)}


def test_keys_file_missing_and_open_to_others(tmp_path: Path) -> None:
    p = str(tmp_path / "keys")
    assert usage_error(load_keys_file, p) == (
        f"keys file {p} does not exist; create it with one `CLIENT_ID HEXKEY` line per client"
    )
    write(tmp_path / "keys", f"alpha {HEX_A}\n", 0o644)
    assert usage_error(load_keys_file, p) == (
        f"keys file {p} is readable by group or others (mode 0644); run `chmod 600 {p}`"
    )


def test_keys_file_duplicate_client(tmp_path: Path) -> None:
    p = write(tmp_path / "keys", f"alpha {HEX_A}\n# x\nalpha {HEX_B}\n")
    assert usage_error(load_keys_file, p) == (
        f"keys file {p} line 3: client id 'alpha' already has a key on line 1; "
        "give each client id one line"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"alpha {HEX_A}\nbeta\n", "line 2: expected `CLIENT_ID HEXKEY` (two fields), found 1"),
        (f"alpha {HEX_A} extra\n", "line 1: expected `CLIENT_ID HEXKEY` (two fields), found 3"),
        (
            "\n\nalpha abcd\n",
            "line 3: the key for 'alpha' must be 64 hex characters but it "
            "has 4 characters; make one with `dst keygen FILE`",
        ),
        (
            f"alpha {HEX_A[:-1]}z\n",
            "line 1: the key for 'alpha' must be 64 hex characters "
            "but it contains 'z', which is not a hex digit; make one with `dst keygen FILE`",
        ),
    ],
)
def test_keys_file_malformed_lines(tmp_path: Path, content: str, message: str) -> None:
    p = write(tmp_path / "keys", content)
    assert usage_error(load_keys_file, p) == f"keys file {p} {message}"


def test_keys_file_not_utf8_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path / "keys", f"alpha {HEX_A}\n\xff\n".encode("latin-1"))
    assert usage_error(load_keys_file, p) == f"keys file {p} line 2: is not valid UTF-8 text"


def test_keys_file_without_keys(tmp_path: Path) -> None:
    p = write(tmp_path / "keys", "# nobody yet\n\n")
    assert usage_error(load_keys_file, p) == (
        f"keys file {p} holds no keys; add one `CLIENT_ID HEXKEY` line per client"
    )
