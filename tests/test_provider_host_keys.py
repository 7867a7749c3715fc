"""Parsing the host keys providers publish (AWS console block, GCP guest attributes): what the SSH runner
will pin before the first login, so a wrong parse would pin the wrong key or none."""

from __future__ import annotations

from ftplan.providers.host_keys import from_console_output, openssh_key

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG7hQ2u5cH0m1mS0m3b8i0Jx1Kd2V3QeXH0fVtq3h9Qz"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQC7x0Qx5bW9m1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0"


def block(*keys: str, prefix: str = "") -> str:
    body = "".join(f"{prefix}{k} root@ip-10-0-0-1\n" for k in keys)
    return f"{prefix}-----BEGIN SSH HOST KEY KEYS-----\n{body}{prefix}-----END SSH HOST KEY KEYS-----\n"


def test_block_with_console_prefixes_and_comments():
    text = "boot noise\n" + block(RSA, ED, prefix="[   12.345678] cloud-init[880]: ") + "login: "
    assert from_console_output(text) == [RSA, ED]


def test_the_last_complete_block_wins_after_a_reboot():
    assert from_console_output(block(ED) + "reboot\n" + block(ED2)) == [ED2]


def test_no_block_or_a_cut_block_is_not_yet_published():
    assert from_console_output("") is None
    assert from_console_output("-----BEGIN SSH HOST KEY KEYS-----\n" + ED + "\n") is None  # cut mid-block
    assert from_console_output("-----END SSH HOST KEY KEYS-----\n") is None
    assert from_console_output(block()) is None  # an empty block publishes nothing


def test_fingerprints_and_garbage_are_not_keys():
    assert openssh_key("256 SHA256:3mXq1b3Q8m2Yq2nJxk1aY0v4o5kqjv6r8dWQyM3lJ9Y root@host (ECDSA)") is None
    assert openssh_key("ssh-ed25519 short") is None
    assert openssh_key("ssh-ed25519 " + ED.split()[1]) == ED  # a GCP attribute value without a comment
