"""Tests of data_pipelines.download: whole files only, nothing left behind, SIGTERM included."""
import contextlib
import hashlib
import http.server
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from data_pipelines import download

REPO = pathlib.Path(__file__).resolve().parents[2]
PAYLOAD = os.urandom(1 << 20)
SENT_FIRST = 1 << 18  # Bytes sent before the server stalls.


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves PAYLOAD; when the server is `slow`, sends part of it, then waits for `release`."""

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    self.send_response(200)
    self.send_header('Content-Length', str(len(PAYLOAD)))
    self.end_headers()
    try:
      if server.slow:
        self.wfile.write(PAYLOAD[:SENT_FIRST])
        self.wfile.flush()
        server.sent.set()
        server.release.wait(60)
        self.wfile.write(PAYLOAD[SENT_FIRST:])
      else:
        self.wfile.write(PAYLOAD)
    except OSError:
      pass  # The client went away.

  def log_message(self, *args):
    del args


@contextlib.contextmanager
def serve(slow: bool):
  """A real HTTP server on 127.0.0.1 (ephemeral port); yields (base URL, server)."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  server.slow, server.sent, server.release = slow, threading.Event(), threading.Event()
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}', server
  finally:
    server.release.set()
    server.shutdown()
    server.server_close()


def everything_under(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(path.rglob('*')) if path.exists() else []


def test_fetch_writes_the_whole_file(tmp_path, no_proxy):
  dest = tmp_path / 'data' / 'medmnist' / 'file.npz'
  previous = signal.getsignal(signal.SIGTERM)
  with serve(slow=False) as (url, _):
    download.fetch(f'{url}/file.npz', dest, hashlib.md5(PAYLOAD).hexdigest())
  assert dest.read_bytes() == PAYLOAD
  assert everything_under(tmp_path / 'data') == [dest.parent, dest]  # No .part file left.
  assert signal.getsignal(signal.SIGTERM) is previous  # Handlers restored.


def test_fetch_with_a_wrong_md5_leaves_nothing(tmp_path, no_proxy):
  data = tmp_path / 'data'
  data.mkdir()
  with serve(slow=False) as (url, _), pytest.raises(download.ChecksumError, match='md5'):
    download.fetch(f'{url}/file.npz', data / 'medmnist' / 'file.npz', '0' * 32)
  assert everything_under(data) == []  # Neither the .part file nor the folder it made.


def test_fetch_failure_says_where_to_put_the_file(tmp_path, no_proxy):
  dest = tmp_path / 'data' / 'file.npz'
  with pytest.raises(OSError, match=f'put it at {dest}'):
    download.fetch('http://127.0.0.1:9/file.npz', dest, '0' * 32, timeout=5)  # Nobody listens.
  assert not (tmp_path / 'data').exists()


SCRIPT = """
import signal, sys
# A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT
# ignored, and Python then leaves it ignored; a user's terminal delivers it. Be that terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
from data_pipelines import datasets
url, data_dir, tfds_dir = sys.argv[1:]
cfg = dict(name='medmnist', flag='breastmnist', mirror=url, tfds_dir=tfds_dir)
try:
  datasets.get_dataset(cfg, 'train', data_dir=data_dir)
except KeyboardInterrupt as e:  # As fm_adapt.main does.
  print(f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
  sys.exit(getattr(e, 'exit_status', 130))
"""


def wait_for_part_file(folder: pathlib.Path, proc: subprocess.Popen) -> pathlib.Path:
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and proc.poll() is None:
    parts = list(folder.rglob('*.part'))
    if parts:
      time.sleep(0.5)  # Let the client write what it got and block waiting for the rest.
      return parts[0]
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f'No .part file under {folder}; output: {proc.communicate()}')


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_signal_during_download_removes_the_part_file_and_temp_folders(tmp_path, no_proxy,
                                                                       signum):
  data, tfds_dir, temp = tmp_path / 'data', tmp_path / 'tfds', tmp_path / 'tmp'
  data.mkdir()
  temp.mkdir()
  env = {**os.environ, 'TMPDIR': str(temp), 'PYTHONPATH': str(REPO)}
  with serve(slow=True) as (url, server):
    proc = subprocess.Popen([sys.executable, '-c', SCRIPT, url, str(data), str(tfds_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert server.sent.wait(60), proc.communicate()
    part = wait_for_part_file(data, proc)
    assert part.parent == data / 'medmnist' and part.name.startswith('.breastmnist.npz.')
    partial_size = part.stat().st_size
    assert [p.name.startswith('fm_adapt_tfds_downloads_') for p in temp.iterdir()] == [True]
    start = time.monotonic()
    proc.send_signal(signum)
    try:  # The server never sends the rest: without the handler the process would hang.
      _, stderr = proc.communicate(timeout=120)  # Generous: a loaded 2-core CI box is slow.
    finally:
      proc.kill()
    elapsed = time.monotonic() - start
  name = signal.Signals(signum).name
  assert proc.returncode == 128 + signum, stderr
  assert elapsed < 60
  assert f'stopped by {name}; the partial file was removed' in stderr
  assert f'{url}/breastmnist.npz' in stderr and 'Run the same command again' in stderr
  assert everything_under(data) == []  # No .part file, no medmnist/ folder made for it.
  assert everything_under(temp) == []  # No TFDS download folder, no tmp*tfds.
  assert everything_under(tfds_dir) == []
  assert 0 < partial_size < len(PAYLOAD)  # It was stopped mid-file, bytes written.
