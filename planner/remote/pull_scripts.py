"""Scripts the artifact pull runs on the machine (standard-library Python >= 3.6), kept as text here so the
pull's logic (artifact_pull.py) reads apart from them."""

# Remote sha256 manifest of a file or folder as JSON. Python's hashlib (OpenSSL) is several times
# faster than coreutils' sha256sum; sha256sum is the fallback on a machine without python3.
MANIFEST_PY = r"""
import hashlib, json, os, sys
base, name = sys.argv[1], sys.argv[2]
def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
os.chdir(base)
out = {}
if os.path.isfile(name) and not os.path.islink(name):
    out[name] = digest(name)
else:
    for d, dirs, files in os.walk(name):
        for f in files:
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out[p] = digest(p)
print(json.dumps(out))
"""

# The pull's sender, run on the machine: one pass per file writes a tar stream to stdout and its
# sha256 manifest to stderr. Each 1 MiB block is read once, hashed, then handed to sshd with
# sendfile() (zero-copy from the page cache) - the bytes hashed are the bytes sent. Against GNU tar
# plus a second manifest process this saves a full re-read and hash of every file on the machine,
# which on a CPU-bound link (the 2-core loopback benchmark) was the gap to OpenSSH scp.
# Links, fifos and devices are archived as what they are: the receiver refuses what is unsafe.
# A file that changes, shrinks or vanishes while read makes it exit 75 (the pull retries).
# Python >= 3.6 (no walrus), standard library only.
SENDER_PY = r"""
import hashlib, json, os, stat, sys, tarfile
base, name, marker = sys.argv[1], sys.argv[2], sys.argv[3]
os.chdir(base)
CHUNK = 1 << 20
buf = bytearray(CHUNK)
view = memoryview(buf)
manifest, first_link, changed = {}, {}, []
zero_copy = [hasattr(os, "sendfile")]

def write(data):
    data = memoryview(data)
    while data:
        data = data[os.write(1, data):]

def header(path, st, kind, size=0, link=""):
    info = tarfile.TarInfo(path)
    info.type, info.size, info.linkname = kind, size, link
    info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

def send_file(path):
    try:
        f = open(path, "rb", buffering=0)
    except OSError:
        changed.append(path)
        return
    with f:
        fd = f.fileno()
        st = os.fstat(fd)
        size, digest, off = st.st_size, hashlib.sha256(), 0
        header(path, st, tarfile.REGTYPE, size)
        while off < size:
            n = f.readinto(view[:min(CHUNK, size - off)])
            if not n:
                break
            digest.update(view[:n])
            start, end = off, off + n
            while zero_copy[0] and off < end:
                try:
                    sent = os.sendfile(1, fd, off, end - off)
                except OSError:
                    zero_copy[0] = False
                    break
                if not sent:
                    break
                off += sent
            if off < end:
                write(view[off - start:n])
                off = end
        if off < size:
            changed.append(path)
            write(bytes(size - off))
        write(bytes(-size % 512))
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            changed.append(path)
        manifest[path] = digest.hexdigest()

def send(path):
    try:
        st = os.lstat(path)
    except OSError:
        changed.append(path)
        return
    mode = st.st_mode
    if stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in first_link:
            header(path, st, tarfile.LNKTYPE, link=first_link[key])
            manifest[path] = manifest[first_link[key]]
        else:
            first_link[key] = path
            send_file(path)
    elif stat.S_ISDIR(mode):
        header(path, st, tarfile.DIRTYPE)
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            changed.append(path)
            entries = []
        for entry in entries:
            send(os.path.join(path, entry))
    elif stat.S_ISLNK(mode):
        header(path, st, tarfile.SYMTYPE, link=os.readlink(path))
    elif stat.S_ISFIFO(mode):
        header(path, st, tarfile.FIFOTYPE)
    elif stat.S_ISCHR(mode):
        header(path, st, tarfile.CHRTYPE)
    elif stat.S_ISBLK(mode):
        header(path, st, tarfile.BLKTYPE)

def announce(path):
    # A PAX global header first: the bytes of file data that follow, so the receiver can check its free
    # space before writing and stop a stream that sends more than it announced.
    total = 0
    for d, dirs, files in ([(os.path.dirname(path), [], [os.path.basename(path)])] if not os.path.isdir(path)
                           or os.path.islink(path) else os.walk(path)):
        for f in files:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    rec = " ftplan.size=%d\n" % total
    n = len(rec) + 1
    while len(str(n)) + len(rec) != n:
        n += 1
    body = (str(n) + rec).encode()
    info = tarfile.TarInfo("pax_global_header")
    info.type, info.size = tarfile.XGLTYPE, len(body)
    write(info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512))

announce(name)
send(name)
write(bytes(1024))
sys.stderr.write("\n" + marker + "\n" + json.dumps(manifest) + "\n")
sys.exit(75 if changed else 0)
"""
