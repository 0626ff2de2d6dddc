"""Tests of the scratchd_root mock plugin against a fake of mock that does
what real mock does, and a real scratchd.

Run by `cargo test` (tests/e2e/mock.rs), which starts the server and sets:
  SCRATCHD          the scratchd binary
  SCRATCHD_URI      the server (nbd+unix:///?socket=...), a tmpdisk with linger
  SCRATCHD_CONTROL  its control socket
  SCRATCHD_STATE_DIR  where `scratchd attach` keeps its records
  WORK              a scratch directory of the test's own

Every fact the fake models names the place in mock's source (upstream
mock, py/) it comes from; mock's code itself is not copied here.
"""

import contextlib
import copy
import fcntl
import glob
import importlib.machinery
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCHD = os.environ["SCRATCHD"]
URI = os.environ["SCRATCHD_URI"]
CONTROL = os.environ["SCRATCHD_CONTROL"]
WORK = os.environ["WORK"]
PLUGIN_DIR = os.path.join(WORK, "plugins")


# --- mockbuild.exception: the types and exit codes mock reports ---

def _fake_mock_exceptions():
    module = types.ModuleType("mockbuild.exception")

    class Error(Exception):
        # mockbuild/exception.py, class Error: resultcode 1, str() is the message.
        resultcode = 1

    class BuildError(Error):
        resultcode = 10  # mockbuild/exception.py, BuildError

    class RootError(Error):
        resultcode = 20  # mockbuild/exception.py, RootError

    class ConfigError(Error):
        resultcode = 3  # mockbuild/exception.py, ConfigError

    class BuildRootLocked(Error):
        resultcode = 60  # mockbuild/exception.py, BuildRootLocked

    for cls in (Error, BuildError, RootError, ConfigError, BuildRootLocked):
        setattr(module, cls.__name__, cls)
    package = types.ModuleType("mockbuild")
    package.__path__ = []
    package.exception = module
    return package, module


MOCKBUILD, EXC = _fake_mock_exceptions()


def load_plugin(under_mock=True):
    """The plugin module, with mockbuild.exception importable (as under
    mock) or not."""
    saved = {k: sys.modules.pop(k, None) for k in ("mockbuild", "mockbuild.exception")}
    if under_mock:
        sys.modules["mockbuild"], sys.modules["mockbuild.exception"] = MOCKBUILD, EXC
    try:
        spec = importlib.util.spec_from_file_location(
            "scratchd_root", os.path.join(HERE, "scratchd_root.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


PLUGIN = load_plugin()


# --- mock's configuration ---

# mockbuild/config.py, PLUGIN_LIST (the built-in plugins, all disabled by
# default except a few; the ones that matter here are off).
PLUGIN_LIST = ["tmpfs", "root_cache", "yum_cache", "mount", "bind_mount", "lvm_root"]


def install_plugin():
    """As the docs say: the file copied into mock's plugin_dir."""
    os.makedirs(PLUGIN_DIR, exist_ok=True)
    shutil.copy(os.path.join(HERE, "scratchd_root.py"), PLUGIN_DIR)


def mock_config(root, append_to_plugins=False, use_bootstrap=True, unique_ext=None,
                repo_updates=(), config_opts=None, **opts):
    """config_opts as mockbuild/config.py's load_config leaves them, then
    the site configuration of docs/BUILD-FARMS.md on top."""
    config = {
        "root": root,
        "basedir": os.path.join(WORK, "mock"),  # config.py: config_opts['basedir']
        "use_bootstrap": use_bootstrap,  # config.py: config_opts['use_bootstrap'] = True
        "clean": True,  # config.py: config_opts['clean'] = True
        "plugins": list(PLUGIN_LIST),
        "plugin_dir": PLUGIN_DIR,
        "repo_updates": list(repo_updates),  # the fake's stand-in for the repositories
        "plugin_conf": {p + "_enable": False for p in PLUGIN_LIST},
    }
    for p in PLUGIN_LIST:
        config["plugin_conf"][p + "_opts"] = {}
    # config.py: config_opts['config_paths'] lists the files read (the
    # chroot's .cfg here; site-defaults.cfg and includes in real mock).
    cfg = os.path.join(WORK, "etc", root + ".cfg")
    if not os.path.exists(cfg):
        os.makedirs(os.path.dirname(cfg), exist_ok=True)
        with open(cfg, "w") as f:
            f.write("config_opts['root'] = %r\n" % root)
    config["config_paths"] = [cfg]
    config.update(config_opts or {})  # what mock's command line sets
    if unique_ext is not None:  # config.py: --uniqueext sets config_opts['unique-ext']
        config["unique-ext"] = unique_ext
    # config.py, after `runtime_plugins =`: every *.py in plugin_dir not in
    # the list is appended to config_opts['plugins'], disabled, with {} opts.
    for path in sorted(glob.glob(PLUGIN_DIR + "/*.py")):
        name = os.path.splitext(os.path.basename(path))[0]
        if name not in config["plugins"]:
            config["plugins"].append(name)
            config["plugin_conf"][name + "_enable"] = False
            config["plugin_conf"][name + "_opts"] = {}
    # The site configuration.
    if append_to_plugins:  # what the docs used to say: a second entry
        config["plugins"].append("scratchd_root")
    config["plugin_conf"]["scratchd_root_enable"] = True
    conf = {"server": URI, "scratchd": SCRATCHD, "connections": 2, "control": CONTROL}
    conf.update(opts)
    config["plugin_conf"]["scratchd_root_opts"] = {k: v for k, v in conf.items() if v is not None}
    return config


# --- mockbuild/plugin.py ---

class Plugins(object):
    """mockbuild/plugin.py, class Plugins."""

    def __init__(self, config):
        self.config = config
        self._hooks = {}
        self.already_initialized = False
        self.plugins = config["plugins"]
        self.plugin_conf = config["plugin_conf"]
        self.plugin_dir = config["plugin_dir"]

    def init_plugins(self, buildroot):
        # init_plugins: once per Plugins object.
        if self.already_initialized:
            return
        self.already_initialized = True
        # init_plugins: every *_opts gets the root's basedir, root, ... .
        for key in list(self.plugin_conf):
            if key.endswith("_opts"):
                self.plugin_conf[key]["basedir"] = buildroot.basedir
                self.plugin_conf[key]["root"] = buildroot.shared_root_name
        # init_plugins: for each entry of the list (twice if listed twice),
        # if enabled: find the module in plugin_dir, execute it anew, check
        # its API version, and call init() unless it is a bootstrap root
        # and the module says run_in_bootstrap = False.
        for plugin in self.plugins:
            if not self.plugin_conf.get(plugin + "_enable"):
                continue
            spec = importlib.machinery.PathFinder.find_spec(plugin, [self.plugin_dir])
            if not spec:
                buildroot.root_log.warning(
                    "%s plugin is enabled in configuration but is not installed", plugin)
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules["mockbuild"], sys.modules["mockbuild.exception"] = MOCKBUILD, EXC
            try:
                spec.loader.exec_module(module)
            finally:
                del sys.modules["mockbuild"], sys.modules["mockbuild.exception"]
            if module.requires_api_version != "1.1":  # plugin.py: current_api_version
                raise EXC.Error("Plugin version mismatch")
            run_in_bootstrap = getattr(module, "run_in_bootstrap", True)
            if not buildroot.is_bootstrap or run_in_bootstrap:
                module.init(self, self.plugin_conf[plugin + "_opts"], buildroot)

    def call_hooks(self, stage, *args, required=False):
        # call_hooks: the hooks in order; an exception propagates; with
        # required=True, a stage nobody registered raises Error.
        hooks = self._hooks.get(stage, [])
        if required and not hooks:
            raise EXC.Error("Feature %s is not provided by any of enabled plugins" % stage)
        for hook in hooks:
            hook(*args)

    def add_hook(self, stage, function):
        # add_hook: a function already registered for the stage is skipped
        # (bound methods of one instance compare equal).
        hooks = self._hooks.setdefault(stage, [])
        if function not in hooks:
            hooks.append(function)


# --- mockbuild/buildroot.py ---

class Buildroot(object):
    """mockbuild/buildroot.py, class Buildroot, as far as the plugin's
    hooks and their order go."""

    def __init__(self, config, plugins, is_bootstrap=False):
        self.config = config
        self.plugins = plugins
        self.is_bootstrap = is_bootstrap
        # __init__: shared_root_name is the root before unique-ext.
        self.shared_root_name = config["root"]
        if "unique-ext" in config:
            config["root"] = "%s-%s" % (config["root"], config["unique-ext"])
        self.mockdir = config["basedir"]
        self.basedir = os.path.join(config["basedir"], config["root"])
        # config.py rootdir '{{basedir}}/{{root}}/root'; for a bootstrap
        # root __init__ sets basedir/root too.
        self.rootdir = os.path.join(self.basedir, "root")
        self.root_log = logging.getLogger("mockbuild")  # __init__: getLog("mockbuild")
        self._lock_file = None
        self.installs = 0
        self.plugins.init_plugins(self)  # __init__, at its end

    def make_chroot_path(self, *paths):
        return os.path.join(self.rootdir, *[p.lstrip("/") for p in paths])

    def initialize(self, prebuild=False):
        # initialize: exclusive lock and _init, or _init_locked when another
        # mock holds the root; the lock is left shared for the run.
        try:
            self._lock_buildroot(exclusive=True)
            self._init(prebuild)
        except EXC.BuildRootLocked:
            pass
        finally:
            self._lock_buildroot(exclusive=False)

    def _init(self, prebuild):
        # _init: make the root directory, call mount_root, note whether
        # .initialized is there (chroot_was_initialized), then install the
        # root if it was not; if it was, and prebuild, with online,
        # update_before_build and clean: update, and call postupdate if
        # the packages changed. The end of _init touches .initialized and
        # calls postinit.
        os.makedirs(self.basedir, exist_ok=True)
        os.makedirs(self.make_chroot_path(), exist_ok=True)
        self.plugins.call_hooks("mount_root")
        rpmdb = self.make_chroot_path("var/lib/rpm/rpmdb.sqlite")
        self.chroot_was_initialized = os.path.exists(self.make_chroot_path(".initialized"))
        if not self.chroot_was_initialized:
            self.installs += 1
            os.makedirs(self.make_chroot_path("var/lib/rpm"), exist_ok=True)
            with open(rpmdb, "w") as f:
                f.write("bash gcc make rpm-build\n")
        elif prebuild and self.config.get("update_before_build", True) and self.config["clean"]:
            # The repositories' updates (a test's stand-in for dnf update).
            updates = self.config.get("repo_updates", [])
            with open(rpmdb) as f:
                new = [u for u in updates if u not in f.read()]
            if new:
                with open(rpmdb, "a") as f:
                    f.write("".join(u + "\n" for u in new))
                self.plugins.call_hooks("postupdate")
        open(self.make_chroot_path(".initialized"), "w").close()
        self.plugins.call_hooks("postinit")

    def _lock_buildroot(self, exclusive):
        # _lock_buildroot: lockf on basedir/buildroot.lock, non-blocking;
        # a conflict is BuildRootLocked.
        if not self._lock_file:
            os.makedirs(self.basedir, exist_ok=True)
            self._lock_file = open(os.path.join(self.basedir, "buildroot.lock"), "a+")
        try:
            fcntl.lockf(self._lock_file.fileno(),
                        (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except IOError:
            raise EXC.BuildRootLocked("Build root is locked by another process.")

    def _unlock_buildroot(self):
        if self._lock_file:
            self._lock_file.close()
        self._lock_file = None

    def finalize(self):
        # finalize: if the root directory exists, take the exclusive lock;
        # with it, postumount; without it (another mock runs), nothing.
        if os.path.exists(self.make_chroot_path()):
            try:
                self._lock_buildroot(exclusive=True)
                self.plugins.call_hooks("postumount")
            except EXC.BuildRootLocked:
                pass
            finally:
                self._unlock_buildroot()

    def delete(self):
        # delete: if basedir exists, lock, umount_root, unlock and remove
        # basedir; postclean in any case.
        if os.path.exists(self.basedir):
            self._lock_buildroot(exclusive=True)
            self.plugins.call_hooks("umount_root")
            self._unlock_buildroot()
            shutil.rmtree(self.basedir)
        self.plugins.call_hooks("postclean")


# --- mockbuild/backend.py, Commands, and mock.py ---

# mock.py, command_parse: --scrub's choices (anything else is rejected by
# the option parser before a root exists).
SCRUB_CHOICES = ("chroot", "cache", "root-cache", "c-cache", "yum-cache", "dnf-cache",
                 "lvm", "overlayfs", "bootstrap", "all")


class Commands(object):
    def __init__(self, plugins, buildroot, bootstrap_buildroot):
        self.plugins = plugins
        self.buildroot = buildroot
        self.bootstrap_buildroot = bootstrap_buildroot

    def clean(self):
        self.buildroot.delete()  # backend.py, Commands.clean

    def scrub(self, kinds):
        # backend.py, Commands.scrub: 'clean' hooks, then per kind the
        # 'scrub' hooks of both roots, then all: delete both roots;
        # chroot: the main root; bootstrap: the bootstrap root.
        self.plugins.call_hooks("clean")
        for kind in kinds:
            self.plugins.call_hooks("scrub", kind)
            if self.bootstrap_buildroot is not None:
                self.bootstrap_buildroot.plugins.call_hooks("scrub", kind)
            if kind == "all":
                self.buildroot.delete()
                if self.bootstrap_buildroot is not None:
                    self.bootstrap_buildroot.delete()
            elif kind == "chroot":
                self.buildroot.delete()
            elif kind == "bootstrap" and self.bootstrap_buildroot is not None:
                self.bootstrap_buildroot.delete()


class Mock(object):
    """One mock process: mock.py's main() and its __main__ block."""

    def __init__(self, config, scrub=(), no_clean=False, cleanup_after=False):
        for kind in scrub:
            if kind not in SCRUB_CHOICES:
                raise ValueError("option --scrub: invalid choice: %r" % kind)
        self.scrub_kinds = list(scrub)
        self.config = config
        # config.py, set_config_opts_per_cmdline: --no-clean sets
        # config_opts['clean'] False (kojid's later runs of a task pass it).
        if no_clean:
            config["clean"] = False
        # config.py, set_config_opts_per_cmdline: cleanup_on_success and
        # _failure are True by default, but False whenever the resultdir
        # is inside the root's basedir, as mock's default resultdir is;
        # so they hold only with a --resultdir elsewhere.
        self.cleanup_after = cleanup_after

    def run(self, mode, action=None, args=()):
        """mock.py, __main__: the exit status of main()."""
        self.args = list(args)
        try:
            return self.main(mode, action)
        except SystemExit as done:
            return done.code
        except EXC.Error as err:  # __main__: mockbuild Error -> its resultcode
            self.error = err
            return err.resultcode
        except Exception as err:  # pylint: disable=broad-except
            self.error = err  # __main__: anything else -> 1
            return 1

    def main(self, mode, action):
        config = self.config
        plugins = Plugins(config)
        # main: with --scrub, use_bootstrap is forced on.
        if self.scrub_kinds:
            config["use_bootstrap"] = True
        self.bootstrap = None
        if config["use_bootstrap"]:
            # main: a copy of the config with a deep copy of plugin_conf and
            # root + '-bootstrap', its own Plugins, is_bootstrap=True.
            bconfig = dict(config)
            bconfig["plugin_conf"] = copy.deepcopy(config["plugin_conf"])
            bconfig["root"] = config["root"] + "-bootstrap"
            self.bootstrap = Buildroot(bconfig, Plugins(bconfig), is_bootstrap=True)
        self.buildroot = Buildroot(config, plugins)
        commands = Commands(plugins, self.buildroot, self.bootstrap)
        # main: --list-snapshots calls list_snapshots (required) on the
        # main root, then the bootstrap root, and exits 0 before
        # run_command and without finalize().
        if mode == "list_snapshots":
            plugins.call_hooks("list_snapshots", required=True)
            if self.bootstrap is not None:
                self.bootstrap.plugins.call_hooks("list_snapshots", required=True)
            sys.exit(0)
        # main: run_command in try, finally finalize() of the main root,
        # then of the bootstrap root (skipped if the first one raises).
        try:
            return self.run_command(mode, action, commands)
        finally:
            self.buildroot.finalize()
            if self.bootstrap is not None:
                self.bootstrap.finalize()

    def run_command(self, mode, action, commands):
        # run_command: init (clean first when config_opts['clean']), clean
        # (or scrub), and the modes that init then work in the root.
        if mode == "init":
            if self.config["clean"]:
                commands.clean()
            self.buildroot.initialize()
        elif mode == "clean":
            if self.scrub_kinds:
                commands.scrub(self.scrub_kinds)
            else:
                commands.clean()
        elif mode == "rebuild":
            self.rebuild(action, commands)
        elif mode in ("snapshot", "rollback-to", "remove_snapshot"):
            # run_command: without a name, 50; else the hook (required) on
            # the main root, then on the bootstrap root. No init: the root
            # need not be mounted.
            if not self.args:
                return 50
            hook = {"snapshot": "make_snapshot", "rollback-to": "rollback_to",
                    "remove_snapshot": "remove_snapshot"}[mode]
            self.buildroot.plugins.call_hooks(hook, self.args[0], required=True)
            if self.bootstrap is not None:
                self.bootstrap.plugins.call_hooks(hook, self.args[0], required=True)
        elif mode in ("shell", "chroot", "installdeps"):
            # run_command: these modes init (no clean) and work in the root.
            self.buildroot.initialize()
            if action:
                action(self.buildroot)
        return 0

    def rebuild(self, build, commands):
        # rebuild.py, rebuild_generic: clean when config_opts['clean'],
        # init, build; then clean if cleanup_on_success; on an exception,
        # clean if cleanup_on_failure and raise it again.
        try:
            if self.config["clean"]:
                commands.clean()
            # rebuild.py, rebuild_generic: init(prebuild=not short_circuit).
            self.buildroot.initialize(prebuild=True)
            if build:
                build(self.buildroot)
            if self.cleanup_after:
                commands.clean()
        except Exception:
            if self.cleanup_after:
                commands.clean()
            raise


def sigterm(_buildroot):
    # mock.py, handle_signals: orphansKill, then sys.exit(128 + signal).
    sys.exit(128 + signal.SIGTERM)


def failing_build(_buildroot):
    raise EXC.BuildError("rpmbuild failed")


def write_marker(text):
    """A build action that leaves `text` in the root."""
    def action(buildroot):
        with open(buildroot.make_chroot_path("marker"), "w") as f:
            f.write(text)
    return action


def read_rpmdb(seen):
    """A build action that appends the root's (stand-in) rpm database to
    `seen`."""
    def action(buildroot):
        with open(buildroot.make_chroot_path("var/lib/rpm/rpmdb.sqlite")) as f:
            seen.append(f.read())
    return action


def read_marker(seen):
    """A build action that appends the root's marker to `seen`."""
    def action(buildroot):
        with open(buildroot.make_chroot_path("marker")) as f:
            seen.append(f.read())
    return action


# --- helpers ---

def exports():
    out = subprocess.run([SCRATCHD, "ctl", "--control", CONTROL, "--json", "list"],
                         stdout=subprocess.PIPE, check=True, universal_newlines=True).stdout
    return {e["name"]: e for e in json.loads(out)["exports"]}


def records():
    state = os.environ["SCRATCHD_STATE_DIR"]
    return sorted(r for r in os.listdir(state) if r.endswith(".json")) \
        if os.path.isdir(state) else []


def instance(mock):
    return getattr(mock.buildroot, PLUGIN.INSTANCE_ATTR)


def root_path(root):
    return os.path.join(WORK, "mock", root, "root")


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class ScratchdRootTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        install_plugin()

    def setUp(self):
        self.log = LogCapture()
        logging.getLogger("mockbuild").addHandler(self.log)

    def tearDown(self):
        logging.getLogger("mockbuild").removeHandler(self.log)
        # Nothing a test attached may outlive it.
        for record in records():
            with open(os.path.join(os.environ["SCRATCHD_STATE_DIR"], record)) as f:
                subprocess.run([SCRATCHD, "detach", json.load(f)["mount"]], check=False)

    def run_mock(self, mode, root, action=None, scrub=(), no_clean=False, cleanup_after=False,
                 args=(), **config):
        mock = Mock(mock_config(root, **config), scrub, no_clean, cleanup_after)
        status = mock.run(mode, action, args)
        return status, mock

    def assert_nothing_attached(self, root):
        self.assertFalse(PLUGIN.is_mount_point(root_path(root)))
        self.assertEqual(records(), [])

    # 1. registered once however it is enabled

    def test_the_documented_configuration_registers_it_once(self):
        for append in (False, True):
            root = "once-%s-x86_64" % append
            status, mock = self.run_mock("init", root, append_to_plugins=append)
            self.assertEqual(status, 0, getattr(mock, "error", None))
            hooks = mock.buildroot.plugins._hooks
            self.assertEqual(sorted(hooks), [
                "list_snapshots", "make_snapshot", "mount_root", "postclean", "postumount",
                "remove_snapshot", "rollback_to", "scrub", "umount_root"])
            self.assertTrue(all(len(h) == 1 for h in hooks.values()), hooks)
            self.assert_nothing_attached(root)

    def test_init_twice_for_one_root_keeps_one_instance(self):
        config = mock_config("twice-x86_64")
        plugins = Plugins(config)
        buildroot = Buildroot(config, plugins)
        first = instance(types.SimpleNamespace(buildroot=buildroot))
        PLUGIN.init(plugins, config["plugin_conf"]["scratchd_root_opts"], buildroot)
        self.assertIs(instance(types.SimpleNamespace(buildroot=buildroot)), first)
        self.assertEqual(len(plugins._hooks["postumount"]), 1)

    # 2. one disk per root; the bootstrap root on local disk

    def test_the_bootstrap_root_stays_local_even_with_a_fixed_name(self):
        root = "bootstrap-x86_64"

        def look(buildroot):
            self.assertTrue(PLUGIN.is_mount_point(buildroot.make_chroot_path()))
            self.assertFalse(PLUGIN.is_mount_point(mock.bootstrap.make_chroot_path()))
            self.assertEqual(len(records()), 1)

        mock = Mock(mock_config(root, name="fixed-bootstrap-test"))
        self.assertEqual(mock.run("rebuild", look), 0, getattr(mock, "error", None))
        # Only the snapshot hooks, doing nothing, in the bootstrap root.
        self.assertEqual(sorted(mock.bootstrap.plugins._hooks), [
            "list_snapshots", "make_snapshot", "remove_snapshot", "rollback_to"])
        # (The loader executes the module anew: compare class names.)
        self.assertEqual(type(getattr(mock.bootstrap, PLUGIN.INSTANCE_ATTR)).__name__,
                         "BootstrapStub")
        self.assert_nothing_attached(root)

    def test_unique_exts_of_one_root_get_disks_of_their_own(self):
        root = "uniq-x86_64"
        mocks = [self.run_mock("init", root, unique_ext=ext, keep_attached=True)
                 for ext in ("a", "b")]
        self.assertEqual([status for status, _ in mocks], [0, 0])
        names = {instance(mock).name for _, mock in mocks}
        self.assertEqual(len(names), 2)
        self.assertEqual(len(records()), 2)
        for ext in ("a", "b"):
            self.assertTrue(PLUGIN.is_mount_point(root_path(root + "-" + ext)))
        for _, mock in mocks:
            mock.buildroot.delete()

    # the task sequence: several mock runs of one root share its disk

    def test_mock_runs_of_one_root_share_its_disk(self):
        root = "share-x86_64"
        status, first = self.run_mock("init", root)
        self.assertEqual(status, 0)
        self.assertEqual(first.buildroot.installs, 1)
        self.assert_nothing_attached(root)
        name = instance(first).name
        self.assertEqual(exports()[name]["state"], "lingering")

        seen = []
        status, second = self.run_mock("rebuild", root, read_rpmdb(seen), no_clean=True)
        self.assertEqual(status, 0)
        self.assertEqual(second.buildroot.installs, 0)  # .initialized found on the disk
        self.assertEqual(seen, ["bash gcc make rpm-build\n"])
        self.assertEqual(instance(second).name, name)
        self.assert_nothing_attached(root)

        # Without --no-clean, mock's rebuild cleans first: a fresh disk.
        status, third = self.run_mock("rebuild", root)
        self.assertEqual(status, 0)
        self.assertEqual(third.buildroot.installs, 1)
        self.assertNotEqual(instance(third).name, name)
        self.assertNotIn(name, exports())

    # 3. --clean and --scrub=chroot|all give a really clean root

    def test_clean_gives_a_fresh_disk_and_drops_the_old_one(self):
        root = "clean-x86_64"
        status, init = self.run_mock("init", root)
        self.assertEqual(status, 0)
        old = instance(init).name
        self.assertIn(old, exports())
        status, mock = self.run_mock("clean", root)
        self.assertEqual(status, 0)
        self.assertNotIn(old, exports())
        status, mock = self.run_mock("rebuild", root, no_clean=True)
        self.assertEqual(status, 0)
        self.assertEqual(mock.buildroot.installs, 1)  # no .initialized: installed anew
        self.assertNotEqual(instance(mock).name, old)

    def test_scrub_without_control_still_gives_a_fresh_disk_within_the_linger(self):
        for kind in ("chroot", "all"):
            root = "scrub-%s-x86_64" % kind
            status, init = self.run_mock("init", root, control=None)
            self.assertEqual(status, 0)
            old = instance(init).name
            status, mock = self.run_mock("clean", root, scrub=[kind], control=None)
            self.assertEqual(status, 0, getattr(mock, "error", None))
            self.assertFalse(os.path.exists(mock.buildroot.basedir))
            self.assertEqual(exports()[old]["state"], "lingering")
            status, mock = self.run_mock("rebuild", root, no_clean=True, control=None)
            self.assertEqual(status, 0)
            self.assertEqual(mock.buildroot.installs, 1)
            self.assertNotEqual(instance(mock).name, old)

    def test_scrub_of_a_cache_keeps_the_disk(self):
        root = "cache-x86_64"
        self.assertEqual(self.run_mock("init", root)[0], 0)
        status, mock = self.run_mock("clean", root, scrub=["cache", "dnf-cache"])
        self.assertEqual(status, 0)
        self.assertEqual(self.run_mock("rebuild", root, no_clean=True)[1].buildroot.installs, 0)
        self.assertIn(instance(mock).name, exports())

    def test_mock_has_no_scratchd_scrub_kind(self):
        with self.assertRaises(ValueError):
            Mock(mock_config("x"), scrub=["scratchd"])

    # failures: exit status right, teardown done

    def test_a_failing_build_detaches_and_keeps_the_disk_for_the_next_run(self):
        root = "failing-x86_64"
        status, mock = self.run_mock("rebuild", root, failing_build)
        self.assertEqual(status, 10)
        self.assert_nothing_attached(root)
        self.assertEqual(exports()[instance(mock).name]["state"], "lingering")

    def test_a_build_with_resultdir_elsewhere_cleans_up_after_itself(self):
        # A workstation: mock --rebuild --resultdir ~/rpms; cleanup_on_success.
        root = "cleanup-x86_64"
        status, mock = self.run_mock("rebuild", root, cleanup_after=True)
        self.assertEqual(status, 0)
        self.assert_nothing_attached(root)
        self.assertFalse(any(n.startswith("mock-") and e["state"] == "lingering"
                             and n == instance(mock).name for n, e in exports().items()))

    def test_sigterm_during_the_build_detaches(self):
        root = "sigterm-x86_64"
        status, _ = self.run_mock("rebuild", root, sigterm)
        self.assertEqual(status, 128 + signal.SIGTERM)
        self.assert_nothing_attached(root)

    def test_finalize_under_another_mocks_lock_leaves_the_disk_to_it(self):
        root = "locked-x86_64"
        holder = []

        def another_mock_starts(buildroot):
            # Another mock process (e.g. --shell) takes the shared lock.
            holder.append(subprocess.Popen(
                [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
                 "fcntl.lockf(f, fcntl.LOCK_SH); print('ok', flush=True); sys.stdin.read()",
                 os.path.join(buildroot.basedir, "buildroot.lock")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True))
            self.assertEqual(holder[0].stdout.readline(), "ok\n")

        status, mock = self.run_mock("shell", root, another_mock_starts)
        self.assertEqual(status, 0)
        self.assertTrue(PLUGIN.is_mount_point(root_path(root)))  # still the other's
        holder[0].communicate("")
        mock.buildroot.finalize()  # the other mock's own end
        self.assert_nothing_attached(root)

    def test_teardown_hooks_warn_instead_of_raising(self):
        root = "warn-x86_64"
        wrapper = os.path.join(WORK, "scratchd-no-detach")
        with open(wrapper, "w") as f:
            f.write('#!/bin/sh\n[ "$1" = detach ] && { echo "detach refused" >&2; exit 1; }\n'
                    'exec "%s" "$@"\n' % SCRATCHD)
        os.chmod(wrapper, 0o755)
        status, mock = self.run_mock("rebuild", root, scratchd=wrapper)
        self.assertEqual(status, 0, getattr(mock, "error", None))
        self.assertTrue(any("cannot detach" in line and "detach refused" in line
                            for line in self.log.lines), self.log.lines)
        # A clean: umount_root and postclean only warn; what fails the run
        # is mock's own removal of the root directory, still a mount point.
        del self.log.lines[:]
        status, mock = self.run_mock("clean", root, scrub=["all"], scratchd=wrapper)
        self.assertEqual(status, 1)
        self.assertIsInstance(mock.error, OSError)
        self.assertTrue(any("cannot detach" in line for line in self.log.lines))
        subprocess.run([SCRATCHD, "detach", root_path(root)], check=True)

    def test_a_refused_attach_fails_the_run_with_a_root_error(self):
        root = "refused-x86_64"
        status, mock = self.run_mock(
            "rebuild", root, server="nbd+unix:///?socket=" + os.path.join(WORK, "no-server"))
        self.assertEqual(status, 20)
        self.assertIsInstance(mock.error, EXC.RootError)
        self.assertIn("attach", str(mock.error))
        self.assert_nothing_attached(root)

    def test_enabled_but_unusable_fails_loudly(self):
        status, mock = self.run_mock("rebuild", "nobinary", scratchd="/nonexistent/scratchd")
        self.assertEqual(status, 3)
        self.assertIn("/nonexistent/scratchd", str(mock.error))
        status, mock = self.run_mock("rebuild", "noserver", server=None)
        self.assertEqual(status, 3)
        self.assertIn("'server'", str(mock.error))

    def test_a_foreign_mount_at_the_root_is_refused(self):
        root = "foreign-x86_64"
        path = root_path(root)
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "mock_chroot_tmpfs", path], check=True)
        try:
            status, mock = self.run_mock("rebuild", root, no_clean=True)
            self.assertEqual(status, 20, getattr(mock, "error", None))
            self.assertIn("not a scratchd attachment", str(mock.error))
            self.assertEqual(records(), [])
        finally:
            subprocess.run(["umount", path], check=True)

    def test_another_disk_attached_at_the_root_is_replaced(self):
        root = "replaced-x86_64"
        status, first = self.run_mock("init", root, name_prefix="other-", keep_attached=True)
        self.assertEqual(status, 0)
        self.assertEqual(len(records()), 1)
        status, second = self.run_mock("rebuild", root, no_clean=True)
        self.assertEqual(status, 0, getattr(second, "error", None))
        self.assertEqual(second.buildroot.installs, 1)  # not the other disk's root
        self.assertTrue(any("cannot" not in line and "detached" in line
                            for line in self.log.lines))
        self.assertNotEqual(instance(first).name, instance(second).name)
        self.assert_nothing_attached(root)

    # 7. mock's snapshot hooks, as lvm_root behaves, on scratchd snapshots

    def list_snapshots(self, root, **config):
        """mock --list-snapshots: its standard output."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status, _ = self.run_mock("list_snapshots", root, **config)
        self.assertEqual(status, 0)
        return out.getvalue().splitlines()

    def test_snapshot_rollback_list_and_remove(self):
        for keep in (False, True):  # lingering between runs, or mounted (frozen)
            root = "snap-%s-x86_64" % keep
            opts = {"keep_attached": keep}
            self.assertEqual(self.run_mock("init", root, **opts)[0], 0)
            self.assertEqual(self.run_mock("shell", root, write_marker("A"), **opts)[0], 0)
            status, mock = self.run_mock("snapshot", root, args=["one"], **opts)
            self.assertEqual(status, 0, getattr(mock, "error", None))
            self.assertIn("scratchd_root: created one snapshot", self.log.lines)
            # lvm_root's make_snapshot: an existing name is refused.
            status, mock = self.run_mock("snapshot", root, args=["one"], **opts)
            self.assertEqual(status, 20)
            self.assertIn("already exists", str(mock.error))
            self.assertEqual(self.run_mock("shell", root, write_marker("B"), **opts)[0], 0)
            status, mock = self.run_mock("snapshot", root, args=["two"], **opts)
            self.assertEqual(status, 0)
            old = instance(mock).name
            self.assertEqual(self.list_snapshots(root, **opts),
                             ["Snapshots for %s:" % root, "  one", "* two"])
            logged = len(self.log.lines)
            status, mock = self.run_mock("rollback-to", root, args=["one"], **opts)
            self.assertEqual(status, 0, getattr(mock, "error", None))
            # Detached: finalize's postumount does not say it stays (seen
            # under real mock, docs/BUILD-FARMS.md).
            self.assertFalse(any("stays attached" in line for line in self.log.lines[logged:]))
            self.assertNotEqual(instance(mock).name, old)  # the next disk is new
            self.assertNotIn(old, exports())  # dropped: the control socket is set
            seen = []
            status, mock = self.run_mock("shell", root, read_marker(seen), **opts)
            self.assertEqual(status, 0)
            self.assertEqual(seen, ["A"])
            self.assertEqual(mock.buildroot.installs, 0)  # the snapshot's root, not installed
            self.assertEqual(self.list_snapshots(root, **opts),
                             ["Snapshots for %s:" % root, "* one", "  two"])
            # A snapshot's clone keeps working when the snapshot goes.
            self.assertEqual(self.run_mock("remove_snapshot", root, args=["one"], **opts)[0], 0)
            self.assertEqual(self.list_snapshots(root, **opts),
                             ["Snapshots for %s:" % root, "  two"])
            seen = []
            self.assertEqual(self.run_mock("shell", root, read_marker(seen), **opts)[0], 0)
            self.assertEqual(seen, ["A"])
            for mode in ("remove_snapshot", "rollback-to"):
                status, mock = self.run_mock(mode, root, args=["one"], **opts)
                self.assertEqual(status, 20, mode)
                self.assertIn("doesn't exist", str(mock.error))
            # mock.py's snapshot modes without a name.
            self.assertEqual(self.run_mock("snapshot", root, **opts)[0], 50)
            self.assertEqual(self.run_mock("clean", root, scrub=["all"], **opts)[0], 0)
            self.assertEqual(self.list_snapshots(root, **opts), ["Snapshots for %s:" % root])
            self.assert_nothing_attached(root)

    def test_a_clean_brings_the_root_back_as_the_current_snapshot(self):
        # lvm_root: postclean removes the head volume; the next mount_root
        # makes it anew from the current snapshot (create_head).
        root = "snapclean-x86_64"
        self.assertEqual(self.run_mock("init", root)[0], 0)
        self.assertEqual(self.run_mock("shell", root, write_marker("A"))[0], 0)
        self.assertEqual(self.run_mock("snapshot", root, args=["base"])[0], 0)
        seen = []
        status, mock = self.run_mock("rebuild", root, read_marker(seen))  # cleans first
        self.assertEqual(status, 0)
        self.assertEqual((seen, mock.buildroot.installs), (["A"], 0))
        # The server lost the snapshot (say, it restarted): the root is
        # installed anew, with a warning, and the record forgets it.
        name = PLUGIN.snapshot_name(instance(mock).key, root, "head", "base")
        subprocess.run([SCRATCHD, "snapshot", "delete", URI, name], check=True)
        status, mock = self.run_mock("rebuild", root)
        self.assertEqual((status, mock.buildroot.installs), (0, 1))
        self.assertTrue(any("cannot start the root as snapshot base" in line
                            for line in self.log.lines), self.log.lines)
        self.assertEqual(self.list_snapshots(root), ["Snapshots for %s:" % root, "  base"])
        self.assertEqual(self.run_mock("clean", root, scrub=["all"])[0], 0)

    def test_snapshot_names_are_keyed_and_kept_off_the_log(self):
        root = "snapname-x86_64"
        self.assertEqual(self.run_mock("init", root)[0], 0)
        status, mock = self.run_mock("snapshot", root, args=["mine"])
        self.assertEqual(status, 0)
        key = instance(mock).key
        name = PLUGIN.snapshot_name(key, root, "head", "mine")
        self.assertTrue(name.startswith("mock-snap-") and "mine" not in name)
        self.assertNotEqual(name, PLUGIN.snapshot_name(key, root, "other", "mine"))
        self.assertNotEqual(name, PLUGIN.snapshot_name(b"another builder!" * 2, root, "head",
                                                       "mine"))
        for line in self.log.lines:
            self.assertNotIn(name, line)
        record = instance(mock).snapshots.path
        self.assertEqual(stat.S_IMODE(os.stat(record).st_mode), 0o600)
        self.assertEqual(self.run_mock("clean", root, scrub=["all"])[0], 0)

    def test_without_bootstrap_the_snapshot_modes_work_too(self):
        root = "snapnoboot-x86_64"
        self.assertEqual(self.run_mock("init", root, use_bootstrap=False)[0], 0)
        status, mock = self.run_mock("snapshot", root, args=["x"], use_bootstrap=False)
        self.assertEqual(status, 0, getattr(mock, "error", None))
        self.assertIsNone(mock.bootstrap)
        self.assertEqual(self.run_mock("clean", root, scrub=["all"])[0], 0)

    # 8. the shared postinit snapshot: one install per configuration

    def shared_mock(self, mode, root, ext, **config):
        return self.run_mock(mode, root, unique_ext=ext, shared_postinit=True, **config)

    def test_the_first_init_publishes_the_root_and_later_builds_clone_it(self):
        root = "shared-x86_64"
        status, first = self.shared_mock("init", root, "a")
        self.assertEqual((status, first.buildroot.installs), (0, 1))
        # The refused attach --from (no snapshot yet) left nothing behind.
        self.assertTrue(any("no shared postinit snapshot" in line for line in self.log.lines))
        self.assertEqual(len(exports()), len(set(exports())))
        self.assert_nothing_attached(root + "-a")
        shared = instance(first).shared[0]
        self.assertTrue(any("published the installed root" in line for line in self.log.lines))
        for ext in ("b", "c"):  # other builds (another builder holding the key)
            seen = []
            status, mock = self.shared_mock("rebuild", root, ext, action=read_rpmdb(seen))
            self.assertEqual(status, 0, getattr(mock, "error", None))
            self.assertEqual(mock.buildroot.installs, 0)  # a clone, not installed
            self.assertEqual(seen, ["bash gcc make rpm-build\n"])
        # Keyed: the name is not in the log, and differs by key.
        self.assertFalse(any(shared in line for line in self.log.lines))
        other = PLUGIN.shared_root_name(b"another farm key" * 2, root, "d", 0)
        self.assertNotEqual(other, PLUGIN.shared_root_name(instance(first).key, root, "d", 0))
        # Without the option, nothing is shared.
        status, mock = self.run_mock("rebuild", root, unique_ext="e")
        self.assertEqual((status, mock.buildroot.installs), (0, 1))

    def test_a_changed_configuration_never_reuses_the_root(self):
        root = "shared-cfg-x86_64"
        self.assertEqual(self.shared_mock("init", root, "a")[0], 0)
        cfg = os.path.join(WORK, "etc", root + ".cfg")
        os.utime(cfg)  # touched, not changed: still the same root
        status, mock = self.shared_mock("rebuild", root, "b")
        self.assertEqual((status, mock.buildroot.installs), (0, 0))
        with open(cfg, "a") as f:
            f.write("config_opts['dnf.conf'] += '[updates-testing]'\n")
        status, mock = self.shared_mock("rebuild", root, "c")
        self.assertEqual((status, mock.buildroot.installs), (0, 1))
        # An option from mock's command line (--addrepo rewrites dnf.conf).
        status, mock = self.shared_mock("rebuild", root, "d",
                                        config_opts={"dnf.conf": "[extra]"})
        self.assertEqual((status, mock.buildroot.installs), (0, 1))

    def test_a_root_older_than_max_age_is_not_reused(self):
        root = "shared-age-x86_64"
        window = 3.0  # seconds
        days = window / 86400
        # Start early in a window, so that the second build is in the same.
        time.sleep(window - time.time() % window + 0.05)
        status, first = self.shared_mock("init", root, "a", max_age_days=days)
        self.assertEqual(status, 0)
        status, mock = self.shared_mock("rebuild", root, "b", max_age_days=days)
        self.assertEqual((status, mock.buildroot.installs), (0, 0))
        time.sleep(window - time.time() % window + 0.05)  # the next window
        status, mock = self.shared_mock("rebuild", root, "c", max_age_days=days)
        self.assertEqual((status, mock.buildroot.installs), (0, 1))
        # The new root is published, the old window's deleted.
        listing = subprocess.run([SCRATCHD, "snapshot", "list", URI], check=True,
                                 stdout=subprocess.PIPE, universal_newlines=True).stdout
        self.assertNotIn(instance(first).shared[0], listing)
        self.assertIn(instance(mock).shared[0], listing)
        status, mock = self.shared_mock("rebuild", root, "d", max_age_days=0)
        self.assertEqual(status, 3)
        self.assertIn("max_age_days", str(mock.error))

    def test_an_update_refreshes_the_shared_root(self):
        root = "shared-upd-x86_64"
        self.assertEqual(self.shared_mock("init", root, "a")[0], 0)
        status, mock = self.shared_mock("rebuild", root, "b", repo_updates=["glibc-2.40-2"])
        self.assertEqual((status, mock.buildroot.installs), (0, 0))
        self.assertTrue(any("published the updated root" in line for line in self.log.lines))
        seen = []
        status, mock = self.shared_mock("rebuild", root, "c", action=read_rpmdb(seen),
                                        config_opts={"update_before_build": False})
        self.assertEqual(status, 0)
        self.assertIn("glibc-2.40-2", seen[0])  # the update, without updating

    def test_concurrent_first_builds_publish_one_root(self):
        root = "shared-race-x86_64"
        results = os.path.join(WORK, "race")
        os.makedirs(results, exist_ok=True)
        children = []
        for ext in "abcd":
            pid = os.fork()
            if pid == 0:  # one mock process
                code = 1
                try:
                    status, mock = self.shared_mock("rebuild", root, ext)
                    with open(os.path.join(results, ext), "w") as f:
                        json.dump({"status": status, "installs": mock.buildroot.installs,
                                   "log": self.log.lines}, f)
                    code = 0
                finally:
                    os._exit(code)
            children.append(pid)
        for pid in children:
            self.assertEqual(os.waitpid(pid, 0)[1], 0)
        runs = []
        for ext in "abcd":
            with open(os.path.join(results, ext)) as f:
                runs.append(json.load(f))
        self.assertEqual([r["status"] for r in runs], [0] * 4)
        published = [r for r in runs if any("published the installed root" in line
                                            for line in r["log"])]
        self.assertEqual(len(published), 1)  # one publishes; none overwrites it
        installed = [r for r in runs if r["installs"]]
        others = [r for r in installed if r not in published]
        for r in others:  # installed too, found the name taken
            self.assertTrue(any("published by another build" in line for line in r["log"]))
        status, mock = self.shared_mock("rebuild", root, "e")
        self.assertEqual((status, mock.buildroot.installs), (0, 0))

    # 6. Koji: attached across mock runs, readable by kojid between them

    def test_koji_keeps_the_root_attached_across_runs(self):
        root = "koji-4711-x86_64"
        rpmdb = os.path.join(root_path(root), "var/lib/rpm/rpmdb.sqlite")
        status, init = self.run_mock("init", root, keep_attached=True)
        self.assertEqual(status, 0)
        # kojid, between runs, from the host: the rpm database, an SRPM
        # unpacked into the root.
        with open(rpmdb) as f:
            self.assertIn("rpm-build", f.read())
        with open(os.path.join(root_path(root), "pkg.src.rpm"), "w") as f:
            f.write("srpm")
        status, build = self.run_mock(
            "rebuild", root, lambda b: self.assertTrue(
                os.path.exists(b.make_chroot_path("pkg.src.rpm"))),
            no_clean=True, keep_attached=True)
        self.assertEqual(status, 0)
        self.assertEqual(build.buildroot.installs, 0)
        self.assertEqual(len(records()), 1)  # reused, not attached again
        status, _ = self.run_mock("rebuild", root, failing_build, no_clean=True,
                                  keep_attached=True)
        self.assertEqual(status, 10)
        self.assertTrue(os.path.exists(rpmdb))  # a failed root stays for a look
        status, _ = self.run_mock("clean", root, keep_attached=True)
        self.assertEqual(status, 0)
        self.assert_nothing_attached(root)
        self.assertNotIn(instance(init).name, exports())

    # 4. the key

    def test_the_key_is_made_safely_and_checked(self):
        basedir = os.path.join(WORK, "keys", "not-yet")  # a missing base directory
        status, mock = self.run_mock("init", "key-x86_64", key_file=os.path.join(
            basedir, "key"))
        self.assertEqual(status, 0, getattr(mock, "error", None))
        info = os.stat(os.path.join(basedir, "key"))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        self.assertEqual(info.st_uid, 0)
        self.assertEqual(info.st_size, PLUGIN.KEY_BYTES)
        # No temporary left; the generations (the init cleaned first).
        self.assertEqual(sorted(os.listdir(basedir)), [".scratchd-generations", "key"])
        generations = os.path.join(basedir, ".scratchd-generations")
        self.assertEqual(stat.S_IMODE(os.stat(generations).st_mode), 0o700)

        os.chmod(os.path.join(basedir, "key"), 0o644)
        with self.assertRaises(PLUGIN.ConfigError):
            PLUGIN.load_key(os.path.join(basedir, "key"))
        short = os.path.join(basedir, "short")
        with open(short, "wb") as f:
            f.write(b"x" * 16)
        os.chmod(short, 0o600)
        with self.assertRaises(PLUGIN.ConfigError):
            PLUGIN.load_key(short)
        link = os.path.join(basedir, "link")
        os.symlink(short, link)
        with self.assertRaises(PLUGIN.ConfigError):
            PLUGIN.load_key(link)
        os.chown(short, 1, 0)
        with self.assertRaises(PLUGIN.ConfigError):
            PLUGIN.load_key(short)

    def test_directories_of_someone_else_are_refused(self):
        # The records' directories are beside the key, in mock's base
        # directory, which mock's group writes (mock's spec file makes
        # /var/lib/mock root:mock 02775): a member may make them first.
        nobody = 65534
        basedir = os.path.join(WORK, "keys", "planted")
        os.makedirs(basedir)
        key_file = os.path.join(basedir, "key")
        key = PLUGIN.load_key(key_file)
        elsewhere = os.path.join(WORK, "keys", "root-only")
        os.mkdir(elsewhere, 0o700)

        def uses(name):
            if name == ".scratchd-snapshots":
                record = PLUGIN.SnapshotRecord(key_file, key, "planted-x86_64", "")
                return [record.load, lambda: record.save({"current": None, "names": []})]
            generations = PLUGIN.Generations(key_file, key, "planted-x86_64", "")
            return [generations.current, generations.bump]

        for name in (".scratchd-snapshots", ".scratchd-generations"):
            path = os.path.join(basedir, name)
            for plant, why in ((lambda p: (os.mkdir(p, 0o700), os.chown(p, nobody, nobody)),
                                "uid 65534"),
                               (lambda p: (os.mkdir(p), os.chmod(p, 0o777)), "mode 777"),
                               (lambda p: os.symlink(elsewhere, p), "symlink")):
                plant(path)
                for use in uses(name):
                    with self.assertRaises(PLUGIN.ConfigError) as refused:
                        use()
                    self.assertIn(why, str(refused.exception))
                self.assertEqual(os.listdir(elsewhere), [])  # nothing written through it
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    shutil.rmtree(path)
        # A mock run with such a directory fails as a configuration error.
        os.mkdir(os.path.join(basedir, ".scratchd-generations"), 0o755)
        status, mock = self.run_mock("init", "planted-x86_64", key_file=key_file)
        self.assertEqual(status, 3, getattr(mock, "error", None))
        self.assertIn("must be a directory of root's", str(mock.error))
        # Made by the plugin, they pass.
        shutil.rmtree(os.path.join(basedir, ".scratchd-generations"))
        for use in uses(".scratchd-snapshots") + uses(".scratchd-generations"):
            use()

    def test_names_are_stable_per_builder_and_unguessable(self):
        key = PLUGIN.load_key(os.path.join(WORK, "mock", ".scratchd-name-key"))
        name = PLUGIN.build_name(key, "names-x86_64", "head")
        self.assertEqual(name, PLUGIN.build_name(key, "names-x86_64", "head"))
        self.assertNotEqual(name, PLUGIN.build_name(key, "names-x86_64", "other"))
        self.assertNotEqual(name, PLUGIN.build_name(key, "names-x86_64", "head", 1))
        self.assertNotEqual(name, PLUGIN.build_name(b"another builder!" * 2, "names-x86_64",
                                                    "head"))
        self.assertTrue(name.startswith("mock-"))
        self.assertNotIn("names", name)
        self.assertEqual(len(name), len("mock-") + 32)

    # 5. names never logged

    def test_names_never_reach_the_log_or_a_command_line(self):
        root = "secret-x86_64"
        # A scratchd that records each command line it is given (as
        # /proc/PID/cmdline shows it to every local user) and the name in
        # its environment, then runs the real one.
        argv_log = os.path.join(WORK, "secret-argv")
        env_log = os.path.join(WORK, "secret-env")
        recorder = os.path.join(WORK, "scratchd-recorder")
        with open(recorder, "w") as f:
            f.write('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\n'
                    'printf "%%s\\n" "${SCRATCHD_NAME:-}" >> %s\n'
                    'exec "%s" "$@"\n' % (argv_log, env_log, SCRATCHD))
        os.chmod(recorder, 0o755)
        names = []  # each run's disk, as attached
        names.append(instance(self.run_mock("init", root, scratchd=recorder)[1]).name)
        names.append(instance(self.run_mock("rebuild", root, failing_build,
                                            scratchd=recorder)[1]).name)
        status, mock = self.run_mock(
            "rebuild", root, server="nbd+unix:///?socket=" + os.path.join(WORK, "no-server"),
            scratchd=recorder)
        self.assertEqual(status, 20)
        errors = [str(mock.error)]
        names.append(instance(mock).name)
        _, mock = self.run_mock("clean", root, scrub=["all"], scratchd=recorder)
        names.append(instance(mock).name)
        self.assertEqual(len(set(names)), 4)
        with open(argv_log) as f:
            argvs = f.read().splitlines()
        with open(env_log) as f:
            given = f.read().splitlines()
        self.assertEqual(len(argvs), len(given))
        commands = [argv.split()[0] for argv in argvs]
        self.assertIn("attach", commands)
        self.assertIn("ctl", commands)  # the clean's drop
        for argv, name in zip(argvs, given):
            if argv.startswith(("attach", "ctl")):
                # The name came in the environment.
                self.assertTrue(name.startswith("mock-") and len(name) == 37, (argv, name))
        for name in set(names) | set(filter(None, given)):
            for line in self.log.lines + errors + argvs:
                self.assertNotIn(name, line)
                self.assertNotIn(name[len("mock-"):len("mock-") + 12], line)
            self.assertTrue(any(PLUGIN.fingerprint(name) in line for line in self.log.lines))

    def test_snapshot_names_stay_off_command_lines(self):
        # The server's snapshot names (mock-snap-…, mock-root-…) are keys
        # where peers share a namespace: the plugin passes them to scratchd
        # in SCRATCHD_SNAPSHOT (snapshot take, delete) and SCRATCHD_FROM
        # (attach --from), as it passes the disk's name in SCRATCHD_NAME.
        argv_log = os.path.join(WORK, "snap-argv")
        env_log = os.path.join(WORK, "snap-env")
        recorder = os.path.join(WORK, "scratchd-snap-recorder")
        with open(recorder, "w") as f:
            f.write('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\n'
                    'printf "%%s %%s\\n" "${SCRATCHD_SNAPSHOT:--}" "${SCRATCHD_FROM:--}" >> %s\n'
                    'exec "%s" "$@"\n' % (argv_log, env_log, SCRATCHD))
        os.chmod(recorder, 0o755)
        root = "snapargv-x86_64"
        opts = {"scratchd": recorder, "keep_attached": True}
        for mode, args in (("init", ()), ("snapshot", ["one"]), ("rollback-to", ["one"]),
                           ("shell", None), ("remove_snapshot", ["one"])):
            action = write_marker("A") if args is None else None
            status, mock = self.run_mock(mode, root, action=action, args=args or (), **opts)
            self.assertEqual(status, 0, (mode, getattr(mock, "error", None)))
        status, mock = self.shared_mock("init", root, "shared", scratchd=recorder)
        self.assertEqual(status, 0, getattr(mock, "error", None))
        self.assertEqual(self.run_mock("clean", root, scrub=["all"], **opts)[0], 0)
        with open(argv_log) as f:
            argvs = f.read().splitlines()
        with open(env_log) as f:
            given = [line.split() for line in f.read().splitlines()]
        taken, started = [], []
        for argv, (snapshot, start) in zip(argvs, given):
            self.assertNotIn("mock-snap-", argv)
            self.assertNotIn("mock-root-", argv)
            if argv.startswith(("snapshot take", "snapshot delete")):
                taken.append(snapshot)
            if start != "-":
                self.assertTrue(argv.startswith("attach"), argv)
                started.append(start)
        # make_snapshot, remove_snapshot, the shared root's publication;
        # the rollback's and the shared root's attach --from.
        self.assertTrue(any(name.startswith("mock-snap-") for name in taken), taken)
        self.assertTrue(any(name.startswith("mock-root-") for name in taken), taken)
        self.assertTrue(any(name.startswith("mock-snap-") for name in started), started)

    # the wrapper (contrib/mock/mock-on-scratchd): results must live off the disk

    def wrapper(self, *args, **env):
        fake = os.path.join(WORK, "fake-scratchd")
        with open(fake, "w") as f:
            f.write('#!/bin/sh\necho "$@"\n'
                    '[ -z "${FAKE_SHOWS_NAME:-}" ] || echo "name: ${SCRATCHD_NAME:-}"\n')
        os.chmod(fake, 0o755)
        environ = {"PATH": os.environ["PATH"], "SCRATCHD": fake, "REAL_MOCK": "/usr/bin/mock"}
        environ.update(env)
        return subprocess.run(["sh", os.path.join(HERE, "mock-on-scratchd")] + list(args),
                              env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, check=False)

    def test_the_wrapper_wants_a_result_directory_off_the_disk(self):
        done = self.wrapper("--rebuild", "pkg.src.rpm")
        self.assertEqual(done.returncode, 2)
        self.assertIn("--resultdir", done.stderr)
        for spelling in (["--resultdir=/var/lib/mock/r"], ["--resultdir", "/var/lib/mock"]):
            done = self.wrapper(*spelling + ["--rebuild", "pkg.src.rpm"])
            self.assertEqual(done.returncode, 2, spelling)
            self.assertIn("on the scratch disk", done.stderr)
        done = self.wrapper("--resultdir", "/home/u/rpms", "--rebuild", "pkg.src.rpm")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), [
            "run", "--size", "40G", "--mount", "/var/lib/mock", "--", "/usr/bin/mock",
            "--resultdir", "/home/u/rpms", "--rebuild", "pkg.src.rpm"])
        done = self.wrapper("--rebuild", "pkg.src.rpm", SCRATCHD_RESULTDIR="/home/u/rpms")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("/usr/bin/mock --resultdir=/home/u/rpms --rebuild pkg.src.rpm",
                      done.stdout)
        self.assertEqual(self.wrapper("--help").returncode, 0)

    def test_the_wrapper_keeps_the_name_off_the_command_line(self):
        done = self.wrapper("--resultdir", "/home/u/rpms", "--rebuild", "pkg.src.rpm",
                            SCRATCHD_SERVER="nbd://farm/", SCRATCHD_BUILD_ID="ws-secret-42",
                            FAKE_SHOWS_NAME="1")
        self.assertEqual(done.returncode, 0, done.stderr)
        argv, name = done.stdout.splitlines()
        self.assertNotIn("ws-secret-42", argv)
        self.assertEqual(argv.split()[:3], ["run", "--server", "nbd://farm/"])
        self.assertEqual(name, "name: ws-secret-42")
        # A private disk takes no name from the caller's environment.
        done = self.wrapper("--resultdir", "/home/u/rpms", "--rebuild", "pkg.src.rpm",
                            SCRATCHD_NAME="stray", FAKE_SHOWS_NAME="1")
        self.assertEqual(done.stdout.splitlines()[1], "name: ")

    def test_outside_mock_the_errors_are_the_plugins_own(self):
        plugin = load_plugin(under_mock=False)
        self.assertFalse(issubclass(plugin.RootError, EXC.Error))
        self.assertEqual(plugin.RootError("x").resultcode, 20)
        self.assertEqual(plugin.ConfigError("x").resultcode, 3)
        self.assertTrue(issubclass(PLUGIN.RootError, EXC.Error))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    unittest.main(verbosity=2)
