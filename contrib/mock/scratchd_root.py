# -*- coding: utf-8 -*-
# mock plugin: the build root on a scratchd scratch disk.
#
# Install: copy this file into mock's plugin directory (`plugin_dir`, e.g.
# /usr/lib/python3.12/site-packages/mockbuild/plugins/), then in a mock
# config (site-defaults.cfg or the chroot's .cfg):
#
#   config_opts['plugins'].append('scratchd_root')
#   config_opts['plugin_conf']['scratchd_root_enable'] = True
#   config_opts['plugin_conf']['scratchd_root_opts'] = {
#       'server': 'nbd+unix:///?socket=/run/scratchd.sock',
#   }
#
# Options (all but `server` optional):
#   server          NBD URI of the scratchd server (nbd://, nbd+unix://,
#                   nbds://...?tls-certificates=DIR)
#   name            export name; default: "mock-" and an HMAC of the build
#                   root's name and unique-ext under a key kept on the
#                   builder, so that the several mock runs of one build
#                   find one disk and nobody else can guess its name
#   key_file        that key (default: <mock's basedir>/.scratchd-name-key,
#                   made with 128 random bits on first use)
#   connections     NBD connections per attach (default 4)
#   mount_options   (default "noatime")
#   scratchd        the scratchd binary (default "scratchd" on PATH)
#   control         the server's control socket, when the server runs on
#                   this host: `--scrub` then drops the disk at once
#                   instead of waiting for the server's linger
#   keep_attached   like the tmpfs plugin's keep_mounted: do not detach at
#                   the end of a mock run (the next run finds it attached)
#
# How the hooks map (see docs/BUILD-FARMS.md): mount_root attaches (the
# server creates and formats the disk on the first attach of a name);
# postumount and umount_root detach (the server keeps the disk for its
# `linger`, so the next mock run of the same build attaches it again with
# its contents); scrub drops it.

import hashlib
import hmac
import os
import subprocess

requires_api_version = "1.1"

PLUGIN = "scratchd_root"


class ScratchdError(Exception):
    """A scratchd command failed; the message says which and why."""


def _mock_error(message):
    """mock's own exception type when running inside mock (mock reports it
    and fails the build cleanly), else ours."""
    try:
        from mockbuild.exception import Error  # pylint: disable=import-outside-toplevel
    except ImportError:
        return ScratchdError(message)
    return Error(message)


def build_name(key, root, unique_ext):
    """The disk's export name: stable for one build root on one builder,
    unguessable elsewhere."""
    digest = hmac.new(key, "{0}\0{1}".format(root, unique_ext).encode(), hashlib.sha256)
    return "mock-" + digest.hexdigest()[:32]


def load_key(path):
    """The builder's naming key, made on first use (mode 0600)."""
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(16)
    tmp = "{0}.{1}".format(path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    # Two mock runs racing here: the first rename wins, both read its key.
    if not os.path.exists(path):
        os.rename(tmp, path)
    else:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read()


def is_mount_point(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == real for line in mounts)


class ScratchdRoot(object):
    """Puts mock's build root (make_chroot_path()) on a scratch disk."""

    def __init__(self, plugins, conf, buildroot):
        self.buildroot = buildroot
        self.conf = conf
        self.server = conf.get("server")
        if not self.server:
            raise _mock_error("{0}: the 'server' option (an NBD URI) is required".format(PLUGIN))
        self.scratchd = conf.get("scratchd", "scratchd")
        self.root_path = os.path.realpath(buildroot.make_chroot_path())
        self.name = conf.get("name") or self._default_name()
        self.attached = is_mount_point(self.root_path)
        for hook in ("mount_root", "postumount", "umount_root", "scrub"):
            plugins.add_hook(hook, getattr(self, "hook_" + hook))
        self.log("scratchd_root: build root {0} on disk {1} of {2}".format(
            self.root_path, self.name, self.server))

    def _default_name(self):
        # mock's top directory (/var/lib/mock), not this root's: the key
        # outlives `mock --scrub=all` of one root.
        basedir = self.buildroot.config.get("basedir", "/var/lib/mock")
        key = load_key(self.conf.get("key_file") or os.path.join(basedir, ".scratchd-name-key"))
        unique_ext = self.buildroot.config.get("unique-ext", "head")
        return build_name(key, self.buildroot.shared_root_name, unique_ext)

    def log(self, message):
        self.buildroot.root_log.info(message)

    def scratchd_do(self, *args):
        command = [self.scratchd] + list(args)
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, check=False)
        if done.returncode != 0:
            raise _mock_error("{0}: `{1}` failed (exit {2}): {3}".format(
                PLUGIN, " ".join(command), done.returncode, done.stderr.strip()))
        return done.stdout.strip()

    def hook_mount_root(self):
        if self.attached:
            self.log("scratchd_root: reusing the disk attached at {0}".format(self.root_path))
            return
        # An attachment of an earlier mock run that was killed (its holder
        # still serving a mount in that run's namespace) would make this a
        # second mount of one file system: let it go first.
        self._detach(quiet=True)
        device = self.scratchd_do(
            "attach", "--name", self.name, "--mount", self.root_path,
            "--connections", str(self.conf.get("connections", 4)),
            "--mount-options", self.conf.get("mount_options", "noatime"),
            self.server)
        self.attached = True
        self.log("scratchd_root: attached {0} at {1}".format(device, self.root_path))

    def hook_postumount(self):
        if self.conf.get("keep_attached"):
            return
        self.hook_umount_root()

    def hook_umount_root(self):
        if not self.attached:
            return
        self._detach(quiet=False)
        self.attached = False
        self.log("scratchd_root: detached {0}; the server keeps the disk for its linger".format(
            self.root_path))

    def hook_scrub(self, what):
        if what not in ("scratchd", "all"):
            return
        self._detach(quiet=True)
        self.attached = False
        control = self.conf.get("control")
        if control:
            self.scratchd_do("ctl", "--control", control, "drop", self.name)
            self.log("scratchd_root: dropped disk {0}".format(self.name))
        else:
            self.log("scratchd_root: disk {0} goes after the server's linger".format(self.name))

    def _detach(self, quiet):
        try:
            self.scratchd_do("detach", self.root_path)
        except Exception:  # pylint: disable=broad-except
            if not quiet:
                raise


def init(plugins, conf, buildroot):
    ScratchdRoot(plugins, conf, buildroot)
