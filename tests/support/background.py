"""A slow subprocess that conftest.py starts as soon as the session's tests are collected.

A test module exposes one as a module-level `WORKER` and uses it through a fixture named
`worker`: it then runs beside the tests collected before that module's, on the core they leave
idle, and the fixture only waits for it (see conftest.pytest_collection_finish).
"""

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable


class Background:
  """`command(dir) -> (argv, env)` run once in a fresh temporary folder `dir`."""

  def __init__(self, prefix: str, command: Callable[[str], tuple[list[str], dict | None]],
               cwd: str | None = None):
    self.prefix, self.command, self.cwd = prefix, command, cwd
    self.proc = self.dir = None

  def start(self):
    if self.proc is not None:
      return
    self.dir = tempfile.mkdtemp(prefix=self.prefix)
    argv, env = self.command(self.dir)
    self.log = open(os.path.join(self.dir, "stderr.txt"), "w+")
    self.proc = subprocess.Popen(argv, env=env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                 stderr=self.log)
    atexit.register(self.stop)  # however the session ends (under xdist, no sessionfinish stop)

  def wait(self, timeout: int = 600) -> str:
    """Waits for the process (starting it if needed); its folder, or AssertionError with the
    end of its stderr if it failed."""
    self.start()
    try:
      returncode = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.stop()
      raise
    self.log.seek(0)
    assert returncode == 0, self.log.read()[-3000:]
    return self.dir

  def stop(self):
    """Kills the process if it still runs and removes its folder."""
    if self.proc is None:
      return
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self.log.close()
    shutil.rmtree(self.dir, ignore_errors=True)
    self.proc = None
