# -*- coding: utf-8 -*-
# mock plugin: the build root on a scratchd scratch disk.
#
# Install: copy this file into mock's plugin directory (`plugin_dir`, e.g.
# /usr/lib/python3.12/site-packages/mockbuild/plugins/). mock lists every
# `*.py` there as a plugin by itself (mockbuild/config.py, the plugin-dir
# scan after `runtime_plugins =`), so enabling it takes only this, in
# /etc/mock/site-defaults.cfg or one chroot's .cfg (no `plugins.append`:
# that would list it twice):
#
#   config_opts['plugin_conf']['scratchd_root_enable'] = True
#   config_opts['plugin_conf']['scratchd_root_opts'] = {
#       'server': 'nbd+unix:///?socket=/run/scratchd/nbd.sock',
#       'control': '/run/scratchd/control.sock',   # a server on this host
#       'keep_attached': True,                     # Koji (docs/BUILD-FARMS.md)
#   }
#   config_opts['plugin_conf']['tmpfs_enable'] = False
#
# mock only warns about an enabled plugin it cannot find, and then builds
# on the local disk; docs/BUILD-FARMS.md has a three-line guard for
# site-defaults.cfg that fails the build instead. Only the main build
# root is put on a disk; mock's bootstrap root stays local (see
# run_in_bootstrap below).
#
# The plugin, not contrib/mock/mock-on-scratchd, is what Koji builders
# use: the wrapper is for one-off mock runs on a workstation (with a
# --resultdir outside /var/lib/mock); kojid runs /usr/bin/mock by path and
# reads the build root between its mock runs.
#
# Options (all but `server` optional):
#   server          NBD URI of the scratchd server (nbd://, nbd+unix://,
#                   nbds://...?tls-certificates=DIR)
#   name_prefix     the export names' prefix (default "mock-"); a server
#                   class's name pattern picks it up (e.g. "big-")
#   name            a fixed export name for this configuration's root
#                   (one build root at a time only: concurrent builds of one
#                   configuration would share it; prefer name_prefix)
#   key_file        the builder's naming key (default: <mock's basedir>/
#                   .scratchd-name-key, 32 random bytes, made on first use)
#   connections     NBD connections per attach (default 4)
#   mount_options   (default "noatime")
#   scratchd        the scratchd binary (default "scratchd" on PATH)
#   control         the server's control socket, when the server runs on
#                   this host: a clean then drops the old disk at once
#                   instead of leaving it to the server's linger
#   keep_attached   do not detach at the end of a mock run (as lvm_root
#                   stays mounted): the next mock run, and kojid between
#                   runs, find the root mounted. For Koji.
#   shared_postinit the shared postinit snapshot: the first build of a
#                   configuration that installs its root publishes it as a
#                   server snapshot, and later builds of that configuration
#                   (on any builder with the same shared key, in the same
#                   owner namespace on the server) start as a clone of it
#   shared_key_file the key naming shared snapshots (default: key_file);
#                   give every builder of a farm the same one to share
#   max_age_days    a shared root's lifetime (default 15, root_cache's)
#
# The disk's name is "mock-" and an HMAC of the build root's name, mock's
# unique-ext and a generation (bumped by every clean) under the key: every
# mock run of one root finds the same disk, a clean gets a fresh one, and
# nobody without the key can name it. The name is the disk's only secret:
# the plugin never logs it (root.log is published by Koji), only a
# fingerprint, the first 8 hex digits of its SHA-256, which
# `scratchd ctl list` output can be matched against.
#
# How mock's hooks map (docs/BUILD-FARMS.md has the table):
#   mount_root   attach (the server makes the disk on the first attach of
#                a name; later ones find it with its contents)
#   postumount   detach, unless keep_attached (the server keeps the disk
#                for its linger)
#   umount_root  detach (`mock --umount`, and first thing in a clean)
#   postclean    detach, drop the old disk (with `control`), and bump the
#                root's generation: the next mount_root gets a fresh disk
#                (started as the current snapshot, if there is one)
#   make_snapshot    `scratchd snapshot take` of the root's disk (the file
#                system frozen while mounted); it becomes the current one
#   rollback_to  the snapshot becomes current; detach and a new generation:
#                the next mount_root attaches `--from` the snapshot
#   remove_snapshot  `scratchd snapshot delete`
#   list_snapshots   the root's snapshots, '* ' before the current one
#   scrub        `all` removes the root's snapshots too
#   postupdate, postinit (with shared_postinit): a root installed now is
#                published as the configuration's shared snapshot, one
#                updated now replaces it
# The snapshots are the server's (copy-on-write: a clone costs nothing
# until written), named by an HMAC under the key like the disks; which
# exist and which is current is kept beside the key (SnapshotRecord).
# Teardown hooks never raise: they log a warning, as mock's tmpfs plugin
# does (mockbuild/plugins/tmpfs.py, _tmpfsUmount), so that one failed
# detach cannot skip the rest of mock's cleanup.

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import subprocess
import time

try:
    # mock's own exception types: mock.py's main reports them with their
    # resultcode (ConfigError 3, RootError 20) instead of a traceback.
    from mockbuild.exception import ConfigError, RootError
    from mockbuild.exception import Error as ScratchdError
except ImportError:  # not under mock (the plugin's tests)

    class ScratchdError(Exception):
        """A scratchd command failed; the message says which and why."""
        resultcode = 1

    class ConfigError(ScratchdError):
        """The plugin's configuration or key cannot be used."""
        resultcode = 3

    class RootError(ScratchdError):
        """The build root's disk cannot be attached."""
        resultcode = 20


requires_api_version = "1.1"

# The bootstrap root stays on local disk: it holds only mock's package
# manager, is small, and is reused by every build of the configuration
# (or unpacked from an image), so a disk of its own would double the
# attaches and exports per mock run for nothing; and a second instance
# there would attach the same export as the main root whenever `name` is
# fixed (mock.py's main deep-copies plugin_conf into the bootstrap root's
# config). The plugin still runs in the bootstrap root, for one reason:
# mock.py's snapshot modes call make_snapshot, rollback_to,
# remove_snapshot and list_snapshots on the bootstrap root too, with
# required=True, and mockbuild/plugin.py's call_hooks raises "Feature ...
# is not provided by any of enabled plugins" for a root where no plugin
# registered them. So there it registers those four as no-ops
# (BootstrapStub) and nothing else.
run_in_bootstrap = True

PLUGIN = "scratchd_root"
KEY_BYTES = 32
DEFAULT_PREFIX = "mock-"
# A shared postinit snapshot's lifetime: root_cache's max_age_days default
# (mockbuild/config.py, root_cache_opts).
DEFAULT_MAX_AGE_DAYS = 15
# `scratchd attach`'s records (docs/RUN.md, "State records"); the same
# variable as scratchd's, empty counting as unset.
STATE_DIR_ENV = "SCRATCHD_STATE_DIR"
DEFAULT_STATE_DIR = "/run/scratchd-builder"
# The attribute that holds a build root's one instance of the plugin.
INSTANCE_ATTR = "_scratchd_root_plugin"


def build_name(key, root, unique_ext, generation=0, prefix=DEFAULT_PREFIX):
    """The disk's export name: stable for one build root (and generation)
    on one builder, unguessable elsewhere."""
    message = "{0}\0{1}".format(root, unique_ext)
    if generation:
        message += "\0{0}".format(generation)
    digest = hmac.new(key, message.encode(), hashlib.sha256)
    return prefix + digest.hexdigest()[:32]


def fingerprint(name):
    """What logs say instead of a disk's name: not enough to reach it."""
    return hashlib.sha256(name.encode()).hexdigest()[:8]


# --- the key and the generations: root-only files beside each other ---

def load_key(path):
    """The builder's naming key: made on first use (32 random bytes, mode
    0600), and refused unless it is a regular file of root's that nobody
    else can read."""
    _make_dir(os.path.dirname(path), 0o755)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    _create_file(path, secrets.token_bytes(KEY_BYTES))
    return _read_key(path)


def _read_key(path):
    key = _read_private(path)
    if len(key) < KEY_BYTES:
        raise ConfigError("{0}: the key {1} has {2} bytes, fewer than {3}: remove it "
                          "(a new one is made; the disks' names change)".format(
                              PLUGIN, path, len(key), KEY_BYTES))
    return key


def _read_private(path, dir_fd=None):
    """A root-only file's contents; FileNotFoundError if there is none.
    With `dir_fd` (a _private_dir), `path` is a name in that directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ConfigError("{0}: cannot open {1}: {2}".format(PLUGIN, path, err))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("{0}: {1} is not a regular file".format(PLUGIN, path))
        if info.st_uid != 0 or info.st_mode & 0o077:
            raise ConfigError(
                "{0}: {1} must belong to root and be readable by root only "
                "(it is uid {2}, mode {3:o})".format(
                    PLUGIN, path, info.st_uid, stat.S_IMODE(info.st_mode)))
        chunks = []
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _create_file(path, data):
    """Writes `data` to a new file under an unpredictable name and links it
    to `path`: a racing mock run's link fails (both then read the first),
    and `path` never exists half-written."""
    tmp = os.path.join(os.path.dirname(path),
                       ".{0}.{1}".format(os.path.basename(path), secrets.token_hex(8)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        raise ConfigError("{0}: cannot create {1}: {2}".format(PLUGIN, tmp, err))
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _replace_file(name, data, dir_fd):
    """Writes `data` to file `name` of directory `dir_fd` (a _private_dir)
    whole, replacing what was there."""
    tmp = ".{0}.{1}".format(name, secrets.token_hex(8))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _make_dir(path, mode):
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as err:
        raise ConfigError("{0}: cannot make {1}: {2}".format(PLUGIN, path, err))


@contextlib.contextmanager
def _private_dir(path, create=True):
    """The directory at `path` (made 0700 if missing and `create`, else
    FileNotFoundError), opened without following a symlink and held by its
    descriptor: it must be root's and nobody else's. Its parent is mock's base directory, which mock's group
    may write: a member could have made it first (to read or plant the
    records root keeps in it), or swap it after the check; files are then
    reached from the descriptor, never by path again."""
    if create:
        _make_dir(os.path.dirname(path), 0o755)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError("{0}: cannot make {1}: {2}".format(PLUGIN, path, err))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ConfigError("{0}: cannot open the directory {1} (a symlink is refused): {2}".format(
            PLUGIN, path, err))
    try:
        info = os.fstat(fd)
        if info.st_uid != 0 or info.st_mode & 0o077:
            raise ConfigError(
                "{0}: {1} must be a directory of root's that nobody else can use (it is uid "
                "{2}, mode {3:o}): someone else may have made it; remove it".format(
                    PLUGIN, path, info.st_uid, stat.S_IMODE(info.st_mode)))
        yield fd
    finally:
        os.close(fd)


class Generations(object):
    """How many times each build root was cleaned, in root-only files in a
    directory beside the key: mixed into the disk's name, so that the
    mount_root after a clean gets a fresh disk even while the server still
    keeps the old one for its linger."""

    def __init__(self, key_file, key, root, unique_ext):
        self.dir = os.path.join(os.path.dirname(key_file), ".scratchd-generations")
        # The file's name is keyed too: it says nothing about the root.
        digest = hmac.new(key, "generation\0{0}\0{1}".format(root, unique_ext).encode(),
                          hashlib.sha256)
        self.name = digest.hexdigest()[:32]
        self.path = os.path.join(self.dir, self.name)

    def current(self):
        try:
            with _private_dir(self.dir, create=False) as dir_fd:
                return self._current(dir_fd)
        except FileNotFoundError:
            return 0

    def _current(self, dir_fd):
        try:
            text = _read_private(self.name, dir_fd)
        except FileNotFoundError:
            return 0
        try:
            return int(text.decode())
        except ValueError:
            raise ConfigError("{0}: {1} does not hold a number".format(PLUGIN, self.path))

    def bump(self):
        with _private_dir(self.dir) as dir_fd:
            _replace_file(self.name, str(self._current(dir_fd) + 1).encode(), dir_fd)


def snapshot_name(key, root, unique_ext, name):
    """The scratchd snapshot behind mock snapshot `name` of a build root:
    keyed like the disks' names, since a snapshot's name is the key to it
    where peers share a namespace (docs/SECURITY.md, "Snapshots")."""
    message = "snapshot\0{0}\0{1}\0{2}".format(root, unique_ext, name)
    digest = hmac.new(key, message.encode(), hashlib.sha256)
    return "mock-snap-" + digest.hexdigest()[:32]


# The config_opts beyond the configuration files that change what a root
# holds: mock's command line sets them (--addrepo rewrites dnf.conf,
# --enablerepo/--disablerepo fill enable_disable_repos, --forcearch ...).
ROOT_SHAPING_OPTS = ("chroot_setup_cmd", "dnf.conf", "yum.conf", "enable_disable_repos",
                     "package_manager", "releasever", "target_arch", "forcearch",
                     "chroot_additional_packages")


def root_digest(config):
    """What a prepared root depends on, as a digest: the content of every
    configuration file mock read (config_opts['config_paths']: what
    root_cache compares its tarball against, by mtime; here by content,
    so a touched but unchanged file keeps the root and a changed one
    never reuses it) and the options that shape the root."""
    digest = hashlib.sha256()
    for path in sorted(config.get("config_paths") or []):
        with open(path, "rb") as f:
            content = f.read()
        digest.update("{0}\0{1}\0".format(path, len(content)).encode() + content)
    shaping = {k: config.get(k) for k in ROOT_SHAPING_OPTS if k in config}
    digest.update(json.dumps(shaping, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def shared_root_name(key, root, digest, epoch):
    """The shared postinit snapshot of a configuration: the same on every
    builder holding `key`, a different one for another configuration or
    another age window (`epoch`)."""
    message = "postinit\0{0}\0{1}\0{2}".format(root, digest, epoch)
    return "mock-root-" + hmac.new(key, message.encode(), hashlib.sha256).hexdigest()[:32]


class SnapshotRecord(object):
    """A build root's mock snapshots and which one is current, in a
    root-only JSON file beside the generations: the server does not list
    snapshots to peers that share a namespace, and mock's names are the
    user's, not the server's. lvm_root keeps its current snapshot in a
    file the same way (mockbuild/plugins/lvm_root.py, snap_info)."""

    def __init__(self, key_file, key, root, unique_ext):
        self.dir = os.path.join(os.path.dirname(key_file), ".scratchd-snapshots")
        digest = hmac.new(key, "snapshots\0{0}\0{1}".format(root, unique_ext).encode(),
                          hashlib.sha256)
        self.name = digest.hexdigest()[:32]
        self.path = os.path.join(self.dir, self.name)

    def load(self):
        """{"current": mock name or None, "names": [mock names]}."""
        try:
            with _private_dir(self.dir, create=False) as dir_fd:
                text = _read_private(self.name, dir_fd)
        except FileNotFoundError:
            return {"current": None, "names": []}
        try:
            record = json.loads(text.decode())
            if not isinstance(record.get("names"), list):
                raise ValueError("no list of names")
            return {"current": record.get("current"), "names": record["names"]}
        except ValueError as err:
            raise ConfigError("{0}: {1} is not a snapshot record ({2})".format(
                PLUGIN, self.path, err))

    def save(self, record):
        with _private_dir(self.dir) as dir_fd:
            _replace_file(self.name, json.dumps(record).encode(), dir_fd)


# --- what is mounted where, and scratchd's records of it ---

def mounted_at(path):
    """(device number "MAJ:MIN", source) of the file system mounted at
    `path` in this mount namespace (the topmost, if several), or None."""
    found = None
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            separator = fields.index("-")
            if _unescape(fields[4]) == path:
                found = (fields[2], _unescape(fields[separator + 2]))
    return found


def mounted_source(path):
    """The source (device) of what is mounted at `path`, or None."""
    found = mounted_at(path)
    return found[1] if found else None


def is_device(mount, device):
    """Whether the mount (as mounted_at gives it) is of block device
    `device`: by its name as the mount's source, or by its number."""
    if not device:
        return False
    if mount[1] == device:
        return True
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return False
    return mount[0] == "{0}:{1}".format(os.major(rdev), os.minor(rdev))


def _unescape(field):
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field


def is_mount_point(path):
    return mounted_source(os.path.realpath(path)) is not None


def attachment_record(path):
    """scratchd attach's record of the attachment mounted at `path`, or
    None. (docs/RUN.md, "State records": one ID.json per attachment.)"""
    state = os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    try:
        entries = sorted(os.listdir(state))
    except FileNotFoundError:
        return None
    for entry in entries:
        if not entry.endswith(".json"):
            continue
        try:
            with open(os.path.join(state, entry)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # going away, or being written
        if record.get("mount") == path:
            return record
    return None


def holder_alive(record):
    """Whether the attachment's holder still runs (a kernel attachment has
    none: the kernel holds it). The pid is checked against its start time,
    field 22 of /proc/PID/stat, as scratchd does."""
    holder = record.get("holder")
    if record.get("kind") == "kernel" and holder is None:
        return True
    if not holder:
        return False
    try:
        with open("/proc/{0}/stat".format(holder["pid"])) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and fields[19] == str(holder["start_time"])


# Where scratchd takes the snapshot a new disk starts as (attach --from),
# and the snapshot `snapshot take` and `snapshot delete` name.
FROM_VAR = "SCRATCHD_FROM"
SNAPSHOT_VAR = "SCRATCHD_SNAPSHOT"


def run_scratchd(scratchd, args, secret=None, snapshot=None, snapshot_var=SNAPSHOT_VAR):
    """Every scratchd command the plugin runs goes through here. Returns
    (exit status, stdout, stderr). `secret` (the disk's name) goes to
    scratchd in the SCRATCHD_NAME environment variable, and `snapshot` (a
    server snapshot's name, a key too) in `snapshot_var`, never in `args`:
    /proc/PID/cmdline shows a command line to every local user, where a
    root process's environment is root's alone. In both outputs the names
    are replaced by their fingerprints, so that no message built from them
    can carry them into a log.
    """
    env = dict(os.environ)
    for var in ("SCRATCHD_NAME", FROM_VAR, SNAPSHOT_VAR):
        env.pop(var, None)
    if secret:
        env["SCRATCHD_NAME"] = secret
    if snapshot:
        env[snapshot_var] = snapshot
    try:
        done = subprocess.run([scratchd] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, check=False,
                              env=env)
    except OSError as err:
        return 127, "", str(err)
    out, err = done.stdout.strip(), done.stderr.strip()
    if secret:
        hidden = "<disk {0}>".format(fingerprint(secret))
        out, err = out.replace(secret, hidden), err.replace(secret, hidden)
    if snapshot:
        # A snapshot's name is a key too: kept out of messages.
        hidden = "<snapshot {0}>".format(fingerprint(snapshot))
        out, err = out.replace(snapshot, hidden), err.replace(snapshot, hidden)
    return done.returncode, out, err


class ScratchdRoot(object):
    """Puts mock's build root (make_chroot_path()) on a scratch disk."""

    def __init__(self, plugins, conf, buildroot):
        self.buildroot = buildroot
        self.conf = conf
        self.server = conf.get("server")
        if not self.server:
            raise ConfigError("{0}: the 'server' option (an NBD URI) is required".format(PLUGIN))
        self.scratchd = conf.get("scratchd", "scratchd")
        if shutil.which(self.scratchd) is None:
            # Enabled but unusable must fail the build, not build on the
            # local disk unnoticed.
            raise ConfigError("{0}: the scratchd binary {1!r} is not there (the 'scratchd' "
                              "option, or PATH)".format(PLUGIN, self.scratchd))
        self.root_path = os.path.realpath(buildroot.make_chroot_path())
        # mock's top directory (/var/lib/mock), not this root's: the key
        # and the generations outlive `mock --scrub=all` of one root.
        basedir = buildroot.config.get("basedir", "/var/lib/mock")
        key_file = conf.get("key_file") or os.path.join(basedir, ".scratchd-name-key")
        key = load_key(key_file)
        unique_ext = buildroot.config.get("unique-ext", "head")
        self.generations = Generations(key_file, key, buildroot.shared_root_name, unique_ext)
        self.key = key
        self.unique_ext = unique_ext
        self.snapshots = SnapshotRecord(key_file, key, buildroot.shared_root_name, unique_ext)
        self.shared = None
        if conf.get("shared_postinit"):
            self.shared = self._shared_names(key, key_file)
        # Set by postupdate: postinit then refreshes the shared snapshot.
        self.updated = False
        self.name = self._name()
        # All of mock's hooks we serve. Commands.scrub
        # (mockbuild/backend.py) removes a root through Buildroot.delete()
        # for `all`, `chroot` and `bootstrap`, which calls umount_root and
        # postclean, and its other kinds (caches, lvm, overlayfs) do not
        # touch the root; the `scrub` hook only removes the root's
        # snapshots on `all`. The snapshot hooks and their order of
        # registration are lvm_root's and overlayfs's
        # (mockbuild/plugins/overlayfs.py, __init__'s add_hook calls).
        for hook in ("make_snapshot", "remove_snapshot", "rollback_to", "list_snapshots",
                     "mount_root", "postumount", "umount_root", "postclean", "scrub"):
            plugins.add_hook(hook, getattr(self, "hook_" + hook))
        if self.shared is not None:
            for hook in ("postinit", "postupdate"):
                plugins.add_hook(hook, getattr(self, "hook_" + hook))
        self.log("build root {0} on scratchd disk {1} of {2}".format(
            self.root_path, fingerprint(self.name), self.server))

    def _shared_names(self, key, key_file):
        """(this age window's shared snapshot, the previous window's)."""
        shared_key_file = self.conf.get("shared_key_file")
        shared_key = load_key(shared_key_file) if shared_key_file else key
        try:
            max_age = float(self.conf.get("max_age_days", DEFAULT_MAX_AGE_DAYS)) * 86400
        except (TypeError, ValueError):
            max_age = 0
        if max_age <= 0:
            raise ConfigError("{0}: 'max_age_days' must be a positive number".format(PLUGIN))
        try:
            digest = root_digest(self.buildroot.config)
        except OSError as err:
            raise ConfigError("{0}: cannot read a configuration file: {1}".format(PLUGIN, err))
        epoch = int(time.time() // max_age)
        root = self.buildroot.shared_root_name
        return (shared_root_name(shared_key, root, digest, epoch),
                shared_root_name(shared_key, root, digest, epoch - 1))

    def _name(self):
        generation = self.generations.current()
        fixed = self.conf.get("name")
        if fixed:
            return fixed if not generation else "{0}-{1}".format(fixed, generation)
        return build_name(self.key, self.buildroot.shared_root_name, self.unique_ext,
                          generation, self.conf.get("name_prefix", DEFAULT_PREFIX))

    def log(self, message):
        self.buildroot.root_log.info("%s: %s", PLUGIN, message)

    def warn(self, message):
        self.buildroot.root_log.warning("%s: %s", PLUGIN, message)

    def scratchd_do(self, *args, snapshot=None, snapshot_var=SNAPSHOT_VAR):
        """Runs scratchd; its output, or the failure as a message."""
        status, out, err = run_scratchd(self.scratchd, args, self.name, snapshot, snapshot_var)
        if status != 0:
            raise ScratchdError("`scratchd {0}` failed (exit {1}): {2}".format(
                args[0], status, err))
        return out

    # --- mount_root: attach, or reuse what is provably ours ---

    def hook_mount_root(self):
        mount = mounted_at(self.root_path)
        record = attachment_record(self.root_path)
        if mount is not None:
            if record is None or not is_device(mount, record.get("device")):
                raise RootError(
                    "{0}: {1} is already a mount point (of {2}) and not a scratchd "
                    "attachment; unmount it (is the tmpfs or lvm_root plugin enabled "
                    "too?)".format(PLUGIN, self.root_path, mount[1]))
            if record.get("export") == self.name and holder_alive(record):
                self.log("reusing disk {0} attached at {1} ({2})".format(
                    fingerprint(self.name), self.root_path, mount[1]))
                return
            # Another disk of this root (an older generation) or one whose
            # holder died: it must go before the root's own disk comes.
            self._detach_or_raise()
        elif record is not None:
            # Attached in another mount namespace: a killed mock run's
            # holder still serving its mount. Attaching beside it would
            # mount one file system twice; let it go first.
            self._detach_or_raise()
        current = self.snapshots.load()["current"]
        if current is not None:
            try:
                device = self._attach(self._snapshot(current))
            except ScratchdError as err:
                # As lvm_root's get_current_snapshot, which forgets a
                # current snapshot that is gone: e.g. the server restarted
                # (its snapshots do not survive it). The root is installed.
                self.warn("cannot start the root as snapshot {0} ({1}); it starts "
                          "empty".format(current, err))
                self._forget_current()
                current = None
        if current is None and self.shared is not None:
            try:
                device = self._attach(self.shared[0])
                current = "the shared postinit " + fingerprint(self.shared[0])
            except ScratchdError as err:
                # None yet (or the server lost it): this build installs
                # the root, and its postinit offers it to the others.
                self.log("no shared postinit snapshot {0} to start from ({1})".format(
                    fingerprint(self.shared[0]), err))
        if current is None:
            try:
                device = self._attach()
            except ScratchdError as err:
                raise RootError("{0}: cannot attach the build root's disk: {1}".format(
                    PLUGIN, err))
        self.log("attached disk {0} at {1} ({2}{3})".format(
            fingerprint(self.name), self.root_path, device,
            "" if current is None else ", as snapshot " + current))

    # --- the shared postinit snapshot (option shared_postinit) ---

    def hook_postupdate(self):
        """mock updated packages in a root that was prepared already
        (buildroot.py, _init, update_before_build): the postinit hook that
        follows refreshes the shared snapshot, as lvm_root re-snapshots in
        its postupdate."""
        self.updated = True

    def hook_postinit(self):
        """The end of mock's _init (.initialized is there, the root is
        ready): a root installed now becomes the configuration's shared
        snapshot, unless another build's is there first; an updated one
        replaces it. Never raises: the build goes on without it."""
        if not getattr(self.buildroot, "chroot_was_initialized", True):
            self._publish_shared("installed")
        elif self.updated:
            self.updated = False
            self._delete_shared(self.shared[0])
            self._publish_shared("updated")

    def _publish_shared(self, why):
        name, previous = self.shared
        args = ["snapshot", "take", "--freeze", self.root_path, self.server]
        status, _, err = run_scratchd(self.scratchd, args, self.name, name)
        if status == 0:
            self.log("published the {0} root as shared postinit snapshot {1}".format(
                why, fingerprint(name)))
            self._delete_shared(previous)  # the last age window's, if still there
        elif "exists" in err:
            # The server refuses a second snapshot of one name, atomically:
            # another build of this configuration published first.
            self.log("shared postinit snapshot {0} was published by another build".format(
                fingerprint(name)))
        else:
            self.warn("cannot publish shared postinit snapshot {0}: {1}".format(
                fingerprint(name), err))

    def _delete_shared(self, name):
        run_scratchd(self.scratchd, ["snapshot", "delete", self.server], snapshot=name)

    def _attach(self, snapshot=None):
        """Attaches the root's disk; a disk made now starts as `snapshot`
        if one is given (an existing disk is used as it is). The name goes
        in SCRATCHD_NAME (run_scratchd), and wins over any export the
        server's URI names; the snapshot in SCRATCHD_FROM."""
        args = ["attach", "--mount", self.root_path,
                "--connections", str(self.conf.get("connections", 4)),
                "--mount-options", self.conf.get("mount_options", "noatime")]
        return self.scratchd_do(*(args + [self.server]), snapshot=snapshot, snapshot_var=FROM_VAR)

    def _forget_current(self):
        record = self.snapshots.load()
        record["current"] = None
        self.snapshots.save(record)

    def _snapshot(self, name):
        return snapshot_name(self.key, self.buildroot.shared_root_name, self.unique_ext, name)

    # --- mock's snapshot hooks (mock --snapshot, --rollback-to,
    # --remove-snapshot, --list-snapshots), as lvm_root behaves ---

    def hook_make_snapshot(self, name):
        """lvm_root's make_snapshot: refused if the name exists; the new
        snapshot becomes the current one. The root's disk is snapshotted
        as it is: frozen while mounted here, or lingering (unmounted, hence
        clean) between mock runs."""
        record = self.snapshots.load()
        if name in record["names"]:
            raise RootError("{0}: snapshot {1} already exists".format(PLUGIN, name))
        args = ["snapshot", "take"]
        if is_mount_point(self.root_path):
            args += ["--freeze", self.root_path]
        try:
            snap = self._snapshot(name)
            self.scratchd_do(*(args + [self.server]), snapshot=snap)
        except ScratchdError as err:
            raise RootError("{0}: cannot snapshot the build root's disk: {1}".format(
                PLUGIN, err))
        record["names"].append(name)
        record["current"] = name
        self.snapshots.save(record)
        self.log("created {0} snapshot".format(name))

    def hook_rollback_to(self, name):
        """lvm_root's rollback_to: the snapshot becomes current and the
        root's disk goes (detached and dropped, a new generation): the next
        mount_root attaches a fresh disk started as the snapshot."""
        record = self.snapshots.load()
        if name not in record["names"]:
            raise RootError("{0}: snapshot {1} doesn't exist".format(PLUGIN, name))
        record["current"] = name
        self.snapshots.save(record)
        if self._attached():
            self._detach_or_raise()
        self._new_generation()
        self.log("rolled back to {0} snapshot".format(name))

    def hook_remove_snapshot(self, name):
        """lvm_root's remove_snapshot: refused for an unknown name; the
        current snapshot, removed, is current no more. Disks started as it
        keep working (the server holds its bytes until the last goes)."""
        record = self.snapshots.load()
        if name not in record["names"]:
            raise RootError("{0}: snapshot {1} doesn't exist".format(PLUGIN, name))
        snap = self._snapshot(name)
        status, _, err = run_scratchd(self.scratchd, ["snapshot", "delete", self.server],
                                      snapshot=snap)
        if status != 0:
            # Gone already (a server restart); the record follows.
            self.warn("the server did not delete snapshot {0}: {1}".format(name, err))
        record["names"].remove(name)
        if record["current"] == name:
            record["current"] = None
        self.snapshots.save(record)
        self.log("deleted {0} snapshot".format(name))

    def hook_list_snapshots(self):
        """lvm_root's list_snapshots: mock prints it to standard output,
        the current one marked with '* '."""
        record = self.snapshots.load()
        print("Snapshots for {0}:".format(self.buildroot.shared_root_name))
        for name in record["names"]:
            print(("* " if name == record["current"] else "  ") + name)

    def hook_scrub(self, what):
        """lvm_root's scrub of 'lvm' or 'all' removes every snapshot of the
        root; ours does it for 'all' (mock has no kind of ours)."""
        if what != "all":
            return
        for name in list(self.snapshots.load()["names"]):
            self.hook_remove_snapshot(name)

    def _attached(self):
        return mounted_source(self.root_path) is not None or \
            attachment_record(self.root_path) is not None

    def _detach_or_raise(self):
        try:
            self.scratchd_do("detach", self.root_path)
        except ScratchdError as err:
            raise RootError("{0}: cannot detach what is attached at {1}: {2}".format(
                PLUGIN, self.root_path, err))

    # --- teardown hooks: never raise ---

    def hook_postumount(self):
        if self.conf.get("keep_attached"):
            # Not after a rollback, which detached it (mock's finalize
            # calls postumount after every mode).
            if self._attached():
                self.log("disk {0} stays attached at {1} (keep_attached)".format(
                    fingerprint(self.name), self.root_path))
            return
        self._detach_quietly("the server keeps the disk for its linger")

    def hook_umount_root(self):
        self._detach_quietly("the server keeps the disk for its linger")

    def hook_postclean(self):
        self._detach_quietly("a clean")
        self._new_generation()

    def _new_generation(self):
        """The root's next disk gets a new name; the old one is dropped
        (with `control`) or left to the server's linger."""
        old = self.name
        try:
            self.generations.bump()
            self.name = self._name()
        except (OSError, ScratchdError) as err:
            self.warn("cannot record the clean of {0} ({1}): the next mock run may find "
                      "the old disk".format(self.root_path, err))
        next_disk = "the root's next disk is {0}".format(fingerprint(self.name))
        control = self.conf.get("control")
        if not control:
            self.log("disk {0} goes after the server's linger; {1}".format(
                fingerprint(old), next_disk))
            return
        status, _, err = run_scratchd(self.scratchd, ["ctl", "--control", control, "drop"],
                                      old)
        if status == 0:
            self.log("dropped disk {0}; {1}".format(fingerprint(old), next_disk))
        else:
            # Also when there was no such disk: the clean of a root that
            # was never attached (mock --init cleans first by default).
            self.log("no disk {0} dropped ({1}); {2}".format(fingerprint(old), err, next_disk))

    def _detach_quietly(self, why):
        """Detaches the root if it is attached; a failure is a warning:
        mockbuild/plugins/tmpfs.py, _tmpfsUmount, does the same."""
        if mounted_source(self.root_path) is None and attachment_record(self.root_path) is None:
            return
        try:
            self.scratchd_do("detach", self.root_path)
        except Exception as err:  # pylint: disable=broad-except
            self.warn("cannot detach {0}: {1}".format(self.root_path, err))
            return
        self.log("detached {0}; {1}".format(self.root_path, why))


class BootstrapStub(object):
    """The plugin in a bootstrap root, which stays on local disk: the
    snapshot hooks mock.py calls there with required=True, doing nothing
    (the main root's instance does the work)."""

    def __init__(self, plugins):
        for hook in ("make_snapshot", "remove_snapshot", "rollback_to", "list_snapshots"):
            plugins.add_hook(hook, self.nothing)

    def nothing(self, *_args):
        pass


def init(plugins, conf, buildroot):
    """mock's entry point. Safe to run twice for one build root (a
    configuration that also lists the plugin in config_opts['plugins']):
    mockbuild/plugin.py, Plugins.init_plugins, executes the module anew and
    calls init once per entry of the list, so the one instance lives on
    the build root, not in this module."""
    if getattr(buildroot, INSTANCE_ATTR, None) is not None:
        return
    if getattr(buildroot, "is_bootstrap", False):
        setattr(buildroot, INSTANCE_ATTR, BootstrapStub(plugins))
        return
    setattr(buildroot, INSTANCE_ATTR, ScratchdRoot(plugins, conf, buildroot))
