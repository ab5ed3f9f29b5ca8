"""The harness itself: a worker that dies during a test fails that test.

Each test here runs a small test file in a separate pytest process (pytester)
with the real harness (tests/conftest.py, loaded by path) against real `gw
serve` processes, and checks the outcome of that run: a worker killed without
being declared fails the test that killed it, with the worker, its signal and
the server's log in the report; a declared death passes; a death beyond the
declared ones fails; a death on a module-scoped server fails the test during
which it happened, not the next one nor the module's end.
"""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

HARNESS = Path(__file__).resolve().parent / "conftest.py"

# The inner run's conftest: the real harness, loaded under another name (this
# directory's conftest is not on the inner run's path), its fixtures re-exported.
INNER_CONFTEST = f'''
import importlib.util, sys
sys.path.insert(0, {str(HARNESS.parent)!r})       # the harness's own imports (fragproxy)
spec = importlib.util.spec_from_file_location("gw_harness_under_test", {str(HARNESS)!r})
harness = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = harness
spec.loader.exec_module(harness)
gw_factory = harness.gw_factory
gw_module_factory = harness.gw_module_factory
no_undeclared_deaths = harness.no_undeclared_deaths
'''

INNER_HELPERS = '''
import os, signal
import pytest
from gw_harness_under_test import wait_for

def kill_worker(server, index=0):
    """SIGKILL worker `index` (by pid order); waits for its respawn."""
    pids = server.worker_pids()
    victim = pids[index]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == len(pids),
             20, what="the respawn")
    return victim
'''


def run_inner(pytester, body: str):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_HELPERS + body)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-rA")


def test_an_undeclared_worker_death_fails_the_test_that_killed_it(pytester):
    result = run_inner(pytester, '''
def test_kills_without_declaring(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",))
    victim = kill_worker(server)
    print("VICTIM", victim)

def test_quiet(gw_factory):
    gw_factory(workers=1, listeners=("mqtt",))
''')
    out = result.stdout.str()
    result.assert_outcomes(passed=2, errors=1)
    assert "ERROR at teardown of test_kills_without_declaring" in out
    assert "test_quiet" not in "\n".join(line for line in out.splitlines() if line.startswith("ERROR"))
    victim = next(line.split()[1] for line in out.splitlines() if line.startswith("VICTIM "))
    assert "lost 1 worker death(s) that the test did not declare" in out
    assert f"(pid {victim}) died: signal 9 (SIGKILL)" in out
    assert "--- the server's log" in out and "listening on" in out


def test_declared_deaths_pass_and_extra_ones_fail(pytester):
    result = run_inner(pytester, '''
def test_declares_one_kills_one(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",))
    server.expect_worker_deaths(1)
    kill_worker(server)

def test_declares_one_kills_two(gw_factory):
    server = gw_factory(workers=2, listeners=("mqtt",))
    server.expect_worker_deaths(1)
    kill_worker(server, 0)
    kill_worker(server, 1)

def test_pipeline_killed_undeclared(gw_factory):
    server = gw_factory(workers=1, listeners=("mqtt",))
    first = wait_for(server.pipeline_pid, 20, what="the pipeline")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: server.pipeline_pid() not in (0, first), 20, what="the pipeline's respawn")
''')
    out = result.stdout.str()
    result.assert_outcomes(passed=3, errors=2)
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert any("test_declares_one_kills_two" in e for e in errors), errors
    assert any("test_pipeline_killed_undeclared" in e for e in errors), errors
    assert not any("test_declares_one_kills_one" in e for e in errors), errors
    assert "worker_deaths 2 (declared 1)" in out
    assert "lost 1 pipeline death(s)" in out and "the pipeline process (pid" in out


def test_a_module_scoped_server_charges_the_death_to_its_test(pytester):
    result = run_inner(pytester, '''
@pytest.fixture(scope="module")
def server(gw_module_factory):
    return gw_module_factory(workers=2, listeners=("mqtt",))

def test_a_before(server):
    pass

def test_b_kills(server):
    kill_worker(server, 1)

def test_c_after(server):
    pass

def test_d_declares(server):
    server.expect_worker_deaths(1)
    kill_worker(server, 0)

def test_e_last(server):
    pass
''')
    out = result.stdout.str()
    result.assert_outcomes(passed=5, errors=1)
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 1 and "test_b_kills" in errors[0], errors
