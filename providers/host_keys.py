"""Host keys a provider publishes out of band, as OpenSSH "keytype base64" lines (issue 22).

- AWS: cloud-init's `cc_keys_to_console` prints the instance's public host keys to the serial console
  between `-----BEGIN SSH HOST KEY KEYS-----` and `-----END SSH HOST KEY KEYS-----`; EC2 returns that text
  from GetConsoleOutput (base64-decoded by botocore). Source: cloud-init `cc_keys_to_console` /
  `tools/write-ssh-key-fingerprints`; the block is what AWS's docs tell users to compare with on first connect
  ("Get the instance fingerprint", EC2 User Guide, connect-to-linux-instance).
- GCP: the guest agent writes them as guest attributes in namespace `hostkeys/` (key = key type, value =
  "keytype base64") when metadata `enable-guest-attributes` is TRUE; `gcloud compute ssh` reads them the same
  way (Compute Engine docs, "Storing host keys in guest attributes").
"""

from __future__ import annotations

import re

KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY = re.compile(r"(?<![\w@.-])(" + "|".join(re.escape(t) for t in KEY_TYPES) + r") ([A-Za-z0-9+/]{16,}={0,3})(?=\s|$)")
BEGIN, END = "-----BEGIN SSH HOST KEY KEYS-----", "-----END SSH HOST KEY KEYS-----"


def openssh_key(text: str) -> str | None:
    """The first "keytype base64" pair in `text` (comments and console prefixes dropped), or None."""
    m = _KEY.search(text)
    return f"{m.group(1)} {m.group(2)}" if m else None


def from_console_output(console: str) -> list[str] | None:
    """Host keys from the *last* complete cloud-init block of a serial console (a reboot prints a new one);
    None when no complete block is there yet (cloud-init has not reached that stage)."""
    text = console.replace("\r", "")
    end = text.rfind(END)
    if end < 0:
        return None
    begin = text.rfind(BEGIN, 0, end)
    if begin < 0:
        return None
    keys: list[str] = []
    for line in text[begin + len(BEGIN):end].split("\n"):
        key = openssh_key(line)
        if key and key not in keys:
            keys.append(key)
    return keys or None
