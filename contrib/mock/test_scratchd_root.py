"""Tests of the scratchd_root mock plugin against a small fake of mock's
plugin registry and build root, and a real scratchd.

Run by `cargo test` (tests/e2e/mock.rs), which starts the server and sets:
  SCRATCHD          the scratchd binary
  SCRATCHD_URI      the server (nbd+unix:///?socket=...), a tmpdisk with linger
  SCRATCHD_CONTROL  its control socket
  SCRATCHD_STATE_DIR  where `scratchd attach` keeps its records
  WORK              a scratch directory of the test's own
"""

import importlib.util
import json
import logging
import os
import stat
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCHD = os.environ["SCRATCHD"]
URI = os.environ["SCRATCHD_URI"]
CONTROL = os.environ["SCRATCHD_CONTROL"]
WORK = os.environ["WORK"]


def load_plugin():
    """As mock loads a plugin: the module from its file, by name."""
    spec = importlib.util.spec_from_file_location(
        "scratchd_root", os.path.join(HERE, "scratchd_root.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PLUGIN = load_plugin()


class FakePlugins(object):
    """mock's mockbuild.plugin.Plugins, as far as a plugin sees it."""

    def __init__(self):
        self.hooks = {}

    def add_hook(self, stage, function):
        hooks = self.hooks.setdefault(stage, [])
        if function not in hooks:
            hooks.append(function)

    def call_hooks(self, stage, *args):
        for hook in self.hooks.get(stage, []):
            hook(*args)


class FakeBuildroot(object):
    """mock's Buildroot, as far as a plugin sees it."""

    def __init__(self, root, unique_ext="head"):
        self.shared_root_name = root
        self.basedir = os.path.join(WORK, "mock", root)
        self.config = {"basedir": os.path.join(WORK, "mock"), "unique-ext": unique_ext}
        self.root_log = logging.getLogger("mock.root")
        os.makedirs(self.make_chroot_path(), exist_ok=True)

    def make_chroot_path(self, *parts):
        return os.path.join(self.basedir, "root", *parts)


def mock_process(root, **opts):
    """One mock invocation: the plugin initialised as mock does it."""
    conf = {"server": URI, "scratchd": SCRATCHD, "connections": 2, "control": CONTROL}
    conf.update(opts)
    plugins = FakePlugins()
    buildroot = FakeBuildroot(root)
    PLUGIN.init(plugins, conf, buildroot)
    return plugins, buildroot


def exports():
    out = subprocess.run([SCRATCHD, "ctl", "--control", CONTROL, "--json", "list"],
                         stdout=subprocess.PIPE, check=True, universal_newlines=True).stdout
    return {e["name"]: e for e in json.loads(out)["exports"]}


def records():
    state = os.environ["SCRATCHD_STATE_DIR"]
    return sorted(os.listdir(state)) if os.path.isdir(state) else []


class ScratchdRootTest(unittest.TestCase):

    def assert_nothing_left(self, buildroot):
        self.assertFalse(PLUGIN.is_mount_point(buildroot.make_chroot_path()))
        self.assertEqual([r for r in records() if r.endswith(".json")], [])

    def test_api_version_and_hooks(self):
        self.assertEqual(PLUGIN.requires_api_version, "1.1")
        plugins, _ = mock_process("hooks-x86_64")
        self.assertEqual(sorted(plugins.hooks),
                         ["mount_root", "postumount", "scrub", "umount_root"])

    def test_two_mock_runs_of_one_build_share_its_disk(self):
        # Koji: mock --init, then mock --rebuild: two processes, one build root.
        plugins, buildroot = mock_process("koji-4711-x86_64")
        chroot = buildroot.make_chroot_path()
        plugins.call_hooks("mount_root")
        self.assertTrue(PLUGIN.is_mount_point(chroot))
        with open(os.path.join(chroot, "installed"), "w") as f:
            f.write("gcc make rpm-build\n")
        plugins.call_hooks("postumount")
        self.assert_nothing_left(buildroot)
        self.assertFalse(os.path.exists(os.path.join(chroot, "installed")))
        name = PLUGIN.build_name(
            open(os.path.join(WORK, "mock", ".scratchd-name-key"), "rb").read(),
            "koji-4711-x86_64", "head")
        self.assertEqual(exports()[name]["state"], "lingering")

        plugins, buildroot = mock_process("koji-4711-x86_64")
        plugins.call_hooks("mount_root")
        with open(os.path.join(chroot, "installed")) as f:
            self.assertEqual(f.read(), "gcc make rpm-build\n")
        plugins.call_hooks("umount_root")
        self.assert_nothing_left(buildroot)

        plugins.call_hooks("scrub", "all")
        self.assertNotIn(name, exports())

    def test_scrub_of_something_else_keeps_the_disk(self):
        plugins, buildroot = mock_process("scrub-x86_64")
        plugins.call_hooks("mount_root")
        plugins.call_hooks("scrub", "cache")
        self.assertTrue(PLUGIN.is_mount_point(buildroot.make_chroot_path()))
        plugins.call_hooks("scrub", "scratchd")
        self.assert_nothing_left(buildroot)

    def test_scrub_without_control_leaves_the_disk_to_the_linger(self):
        plugins, buildroot = mock_process("remote-x86_64", control=None)
        plugins.call_hooks("mount_root")
        name = plugins.hooks["scrub"][0].__self__.name
        plugins.call_hooks("scrub", "all")
        self.assert_nothing_left(buildroot)
        self.assertEqual(exports()[name]["state"], "lingering")

    def test_keep_attached_leaves_it_for_the_next_run(self):
        plugins, buildroot = mock_process("keep-x86_64", keep_attached=True)
        plugins.call_hooks("mount_root")
        plugins.call_hooks("postumount")
        self.assertTrue(PLUGIN.is_mount_point(buildroot.make_chroot_path()))
        plugins, buildroot = mock_process("keep-x86_64", keep_attached=True)
        plugins.call_hooks("mount_root")  # reuses it
        self.assertEqual(len([r for r in records() if r.endswith(".json")]), 1)
        plugins.call_hooks("umount_root")
        self.assert_nothing_left(buildroot)

    def test_names_are_stable_per_builder_and_unguessable(self):
        _, a = mock_process("names-x86_64")
        key_file = os.path.join(WORK, "mock", ".scratchd-name-key")
        self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
        key = open(key_file, "rb").read()
        self.assertGreaterEqual(len(key), 16)
        name = PLUGIN.build_name(key, "names-x86_64", "head")
        self.assertEqual(name, PLUGIN.build_name(key, "names-x86_64", "head"))
        self.assertNotEqual(name, PLUGIN.build_name(key, "names-x86_64", "other"))
        self.assertNotEqual(name, PLUGIN.build_name(b"another builder!", "names-x86_64", "head"))
        self.assertNotIn("names", name)
        self.assertEqual(len(name), len("mock-") + 32)
        self.assertTrue(os.path.isdir(a.make_chroot_path()))

    def test_a_refused_attach_fails_the_mock_run_cleanly(self):
        plugins, buildroot = mock_process(
            "refused-x86_64", server="nbd+unix:///?socket=" + os.path.join(WORK, "no-server"))
        with self.assertRaises(PLUGIN.ScratchdError) as caught:
            plugins.call_hooks("mount_root")
        self.assertIn("attach", str(caught.exception))
        self.assert_nothing_left(buildroot)

    def test_a_missing_server_option_is_an_error(self):
        with self.assertRaises(PLUGIN.ScratchdError) as caught:
            PLUGIN.init(FakePlugins(), {"scratchd": SCRATCHD}, FakeBuildroot("noserver"))
        self.assertIn("'server'", str(caught.exception))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    unittest.main(verbosity=2)
